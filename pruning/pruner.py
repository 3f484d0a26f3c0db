"""The global pruner: one ranking over all five kinds of structure, steered by a cost model.

It follows the NViT reference's pruning engine (`pruning_engine_general.py`, method 23):

- A *layer* is the embedding of one residual stream (a ViT has one, a Swin one per stage),
  one kind (head, QK, V, MLP) in one block, or a model-level kind (SigLIP's pool MLP). Each unit's
  value is its saliency (0 once removed) minus `lambda * drop`, where `drop` is how much
  the ranking cost falls when the layer loses one unit at the current widths (0 once the
  layer is down to one group). A layer's units, sorted, are cut into groups of the kind's
  group size (per-head QK/V units: the k-th group takes the k-th slice of every live head's
  sorted dims); a group's value is the sum of its units' (the mean for per-unit criteria,
  magnitude and random, so that groups of different sizes compare fairly).
- At prune step k (counted from 0) all groups, removed ones included, are sorted, and every
  group at or below the value at index `max(1, k * prune_per_iter // pace) - 1` is removed
  (capped at `budget // pace` groups): `prune_per_iter // pace` more groups per step, of any
  kind. At least one group of every layer always survives.
- After the step the cost model's total decides: the run is done when it is at or below
  `target * cost(original)` (a target of 0: no target), when the step budget
  (`budget // prune_per_iter + 1` steps, the reference's maximum) is spent, or when nothing
  removable is left.

The cost that ranks may differ from the cost that stops (`rank_cost`): e.g. rank by a
measured latency table, stop at a MACs budget. Everything is computed from gate values
that are identical on every rank, and masks are broadcast from rank 0 after each step, so
all ranks hold the same masks and stop at the same step.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .cost import CostModel
from .gates import Gates, stream_widths, widths_to_dims
from .saliency import Saliency
from .units import BLOCK_KINDS, KINDS, MODEL_KINDS, UNIT_KINDS, unit_width, width_of

DEFAULT_GROUP_SIZES = {"emb": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16, "pool_mlp": 16}
DEFAULT_PACE = 16  # the reference's --group_size: prune_per_iter // 16 groups per step
# lambda multiplies the cost drop in these units: seconds for latency (tables hold ms; the
# reference applied its lambda, 5e-4 in the paper, to seconds), GMACs, millions of parameters
COST_UNITS = {"latency": 1e-3, "macs": 1e-9, "params": 1e-6}
_WIDTH = {k: UNIT_KINDS[k].width for k in BLOCK_KINDS}


@dataclass
class Group:
    kind: str
    block: int  # the stream for "emb", else the block
    units: list  # indices into the layer's unit tensor (ints, or (head, dim) pairs)
    score: float  # sum (or mean) of the units' saliency
    cost_drop: float  # the ranking cost's drop for the group's width steps, in lambda units
    value: float  # score - lambda * cost_drop: what the ranking sorts
    removed: bool  # every unit already removed


@dataclass
class StepResult:
    removed: dict = field(default_factory=lambda: {k: 0 for k in KINDS})  # groups per kind
    # (kind, block, gate indices) removed, from the masks after the ranks' sync: what the
    # optimizer state is cleared of
    removed_units: list = field(default_factory=list)
    cost: float = 0.0
    ratio: float = 1.0
    reached: bool = False
    stuck: bool = False  # nothing left to remove above the minimum widths
    budget_spent: bool = False  # the --prune_dict budget of steps is used up


class GlobalPruner:
    def __init__(self, gates: Gates, saliency: Saliency, cost: CostModel, target: float,
                 prune_per_iter: int, group_sizes: dict[str, int] | None = None,
                 latency_lambda: float = 0.0, budget: int | None = None,
                 rank_cost: CostModel | None = None, pace: int = DEFAULT_PACE) -> None:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target must be in [0, 1) (0: no target), got {target}")
        if prune_per_iter < 1 or pace < 1 or (budget is not None and budget < 1):
            raise ValueError("prune_per_iter, the pace and the budget must be positive")
        self.gates, self.saliency, self.cost = gates, saliency, cost
        self.rank_cost = cost if rank_cost is None else rank_cost
        self.target, self.prune_per_iter, self.pace = float(target), int(prune_per_iter), int(pace)
        self.group_sizes = {**DEFAULT_GROUP_SIZES, **(group_sizes or {})}
        bad = {k: v for k, v in self.group_sizes.items() if k not in KINDS or int(v) < 1}
        if bad:
            raise ValueError(f"group sizes must be positive and for kinds {KINDS}; got {bad}")
        self.latency_lambda = float(latency_lambda)
        self.budget = budget
        self.original = gates.dims
        self.original_cost = float(cost.total(self.original))
        self.steps = 0

    # ------------------------------------------------------------- state
    @property
    def max_steps(self) -> int | None:
        """The reference's maximum number of prune steps for the budget."""
        return None if self.budget is None else self.budget // self.prune_per_iter + 1

    @property
    def budget_spent(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps

    def groups_due(self, step: int) -> int:
        """How many groups (removed ones included) lie at or below the threshold of step
        `step` (0-based): the reference's index `step * prune_per_iter // pace - 1` + 1."""
        due = step * self.prune_per_iter // self.pace
        if self.budget is not None:
            due = min(due, self.budget // self.pace)
        return max(1, due)

    def widths(self) -> dict:
        return self.gates.widths()

    def current_cost(self) -> float:
        return float(self.cost.total(widths_to_dims(self.widths(), self.original)))

    def ratio(self) -> float:
        return self.current_cost() / self.original_cost

    def minimum_ratio(self) -> float:
        """Cost ratio with every layer down to one group: targets below it are unreachable."""
        g, d = self.group_sizes, self.original
        w = {"embed_dim": d.embed_value([min(g["emb"], e) for e in d.streams])}
        for kind, key in _WIDTH.items():
            w[key] = [min(g[kind] * unit_width(d, kind), x) for x in getattr(d, key)]
        for kind in self.gates.model:
            w[UNIT_KINDS[kind].width] = min(g[kind], width_of(d, kind, 0))
        return self.cost.total(widths_to_dims(w, self.original)) / self.original_cost

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])

    # ------------------------------------------------------------- groups
    def _unit_drop(self, kind: str, index: int, w: dict, dims_now) -> float:
        """The ranking cost's drop when the layer loses one unit, in lambda units; 0 for a
        block layer already down to one group (the reference's rule)."""
        cost = self.rank_cost
        scale = COST_UNITS.get(getattr(cost, "name", "latency"), 1.0)
        streams = stream_widths(w)
        if kind == "emb":
            fewer = list(streams)
            fewer[index] -= 1
            fewer_dims = widths_to_dims(dict(w, embed_dim=self.original.embed_value(fewer)),
                                        self.original)
            return (cost.total(dims_now) - cost.total(fewer_dims)) * scale
        if kind in MODEL_KINDS:  # a model-level layer: its width is a scalar field
            field = UNIT_KINDS[kind].width
            if w[field] <= self.group_sizes[kind]:
                return 0.0
            fewer_dims = widths_to_dims(dict(w, **{field: w[field] - 1}), self.original)
            return (cost.total(dims_now) - cost.total(fewer_dims)) * scale
        now = [streams[self.original.stream_of(index)]] + [w[_WIDTH[k]][index] for k in BLOCK_KINDS]
        i = 1 + BLOCK_KINDS.index(kind)
        step = unit_width(self.original, kind)  # a rotary QK unit is two dims
        if now[i] <= self.group_sizes[kind] * step:
            return 0.0
        fewer = list(now)
        fewer[i] -= step
        return (cost.block_at(index, *now) - cost.block_at(index, *fewer)) * scale

    def _layer_groups(self, kind: str, block: int, score: torch.Tensor,
                      live: torch.Tensor, unit_drop: float) -> list[Group]:
        """The layer's groups in the reference's order: its units sorted ascending, cut into
        consecutive groups (per-head units: slice k of every live head's sorted dims)."""
        g = self.group_sizes[kind]
        score = torch.where(live, score, torch.zeros_like(score)).double().cpu()
        live = live.cpu()
        if score.dim() == 2:  # per-head QK/V: rows are the live heads
            rows = torch.nonzero(self.gates.blocks[block]["head"].detach().cpu() != 0).flatten()
            score, live = score[rows], live[rows]
        else:
            rows, score, live = None, score[None], live[None]
        # removed units first (ties at 0 with live units must not split a removed group)
        order = torch.argsort(torch.where(live, score, float("-inf")), dim=1, stable=True)
        n = score.shape[1]
        additive = self.saliency is None or self.saliency.criterion.additive
        groups = []
        for start in range(0, n, g):
            cols = order[:, start:start + g]
            s = score.gather(1, cols)
            total = float(s.sum()) if additive else float(s.mean())
            drop = cols.shape[1] * unit_drop
            if rows is None:
                units = cols[0].tolist()
            else:
                units = [(int(rows[r]), int(c)) for r in range(len(rows)) for c in cols[r]]
            groups.append(Group(kind, block, units, total, drop,
                                total - self.latency_lambda * drop,
                                not bool(live.gather(1, cols).any())))
        return groups

    def layers(self, scores: dict) -> list[list[Group]]:
        """Every layer's groups (each stream's embedding first, then per block head, QK, V,
        MLP) at the current widths, with their values under the ranking cost."""
        w = self.widths()
        dims_now = widths_to_dims(w, self.original)
        live = self.gates.nest(self.gates.unit_live())
        out = [self._layer_groups("emb", s, scores["emb"][s], live["emb"][s],
                                  self._unit_drop("emb", s, w, dims_now))
               for s in range(len(self.gates.embs))]
        for i in range(self.original.depth):
            for k in BLOCK_KINDS:
                out.append(self._layer_groups(k, i, scores["blocks"][i][k], live["blocks"][i][k],
                                              self._unit_drop(k, i, w, dims_now)))
        for k in live["model"]:
            out.append(self._layer_groups(k, 0, scores["model"][k], live["model"][k],
                                          self._unit_drop(k, 0, w, dims_now)))
        return out

    def candidates(self, scores: dict) -> list[Group]:
        """The lowest live group of every layer that can lose one (the next contenders)."""
        out = []
        for layer in self.layers(scores):
            live = [gr for gr in layer if not gr.removed]
            if len(live) > 1:
                out.append(min(live, key=lambda gr: gr.value))
        return out

    def calibrate_lambda(self, scores: dict, weight: float) -> None:
        """Set lambda so that the median cost penalty of the next contenders is `weight` times
        their median score: a rule for when the cost's units (seconds of a table) and the
        saliency's are unrelated. Unchanged when no contender has a cost drop or a score."""
        cands = self.candidates(scores)
        drops = sorted(c.cost_drop for c in cands if c.cost_drop > 0)
        med_score = statistics.median(c.score for c in cands) if cands else 0.0
        if drops and med_score > 0:
            self.latency_lambda = weight * med_score / statistics.median(drops)

    # ---------------------------------------------------------------- step
    def step(self, model=None, scores: dict | None = None) -> StepResult:
        """One prune step: score (or take `scores` from a `saliency.step` already taken),
        remove every group at or below this step's threshold, report the cost."""
        if scores is None:
            scores = self.saliency.step(model)
        result = StepResult()
        before = [t.detach().clone() for t in self.gates.tensors()]
        layers = self.layers(scores)
        values = sorted(gr.value for layer in layers for gr in layer)
        threshold = values[min(self.groups_due(self.steps), len(values)) - 1]
        stuck = True
        for layer in layers:
            zeroed = 0
            live = sum(not gr.removed for gr in layer)
            for gr in layer:  # the reference's order: ascending within the layer
                if gr.value > threshold:
                    continue
                if zeroed >= len(layer) - 1:
                    break  # at least one group of every layer survives
                zeroed += 1
                if gr.removed:
                    continue
                self.gates.remove(gr.kind, gr.block, gr.units)
                live -= 1
                result.removed[gr.kind] += 1
            stuck = stuck and live <= 1
        self.steps += 1
        result.stuck = self.sync(stuck)
        result.removed_units = self.gates.removed_since(before)
        result.cost = self.current_cost()
        result.ratio = result.cost / self.original_cost
        result.reached = self.target > 0 and result.ratio <= self.target
        result.budget_spent = self.budget_spent
        return result

    def sync(self, stuck: bool) -> bool:
        """Make rank 0's masks and decisions everyone's: a guard against any drift between
        ranks, so that every decision derived from them (stop or go on) is the same."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return stuck
        self.gates.broadcast_from(0)
        flag = torch.tensor([float(stuck)], dtype=torch.float64, device=self.gates.embs[0].device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())
