"""The global pruner: one ranking over all five kinds of structure, steered by a cost model.

At each prune step the saliency of every live unit is turned into candidate groups (per
block and kind: the `group_size` lowest-scoring live units; for QK and V dims that many
from every live head, so each block keeps one width per head). Candidates are ranked by
`score - lambda * cost_drop` and removed greedily, cheapest first, until `prune_per_iter`
units are gone or the cost reaches `target * cost(original)`. A group's score is the sum of
its units' for additive criteria (hessian, taylor: estimates of the loss increase) and their
mean for per-unit ones (magnitude, random). The cost that ranks may differ from the cost
that stops (`rank_cost`): e.g. rank by a measured latency table, stop at a MACs budget. At
least one group of each kind always survives in every block. Everything is computed from
gate values that are identical on every rank, and masks are broadcast from rank 0 after each
step, so all ranks hold the same masks and stop at the same step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from models.dims import Dims

from .cost import CostModel
from .gates import BLOCK_KINDS, KINDS, Gates, widths_to_dims
from .saliency import Saliency

DEFAULT_GROUP_SIZES = {"emb": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16}
# lambda multiplies the cost drop in these units: seconds for latency (tables hold ms; the
# reference applied its lambda, 5e-4 in the paper, to seconds), GMACs, millions of parameters
COST_UNITS = {"latency": 1e-3, "macs": 1e-9, "params": 1e-6}


@dataclass
class Candidate:
    kind: str
    block: int | None
    units: list  # indices into the gate tensor (ints, or (head, dim) pairs for qk/v)
    score: float
    cost_drop: float = 0.0
    rank: float = 0.0


@dataclass
class StepResult:
    removed: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    removed_units: list = field(default_factory=list)  # (kind, block, units) for optimizer clean-up
    cost: float = 0.0
    ratio: float = 1.0
    reached: bool = False
    stuck: bool = False  # nothing left to remove above the minimum widths
    budget_spent: bool = False  # the total number of units allowed (--prune_dict) is removed


class GlobalPruner:
    def __init__(self, gates: Gates, saliency: Saliency, cost: CostModel, target: float,
                 prune_per_iter: int, group_sizes: dict[str, int] | None = None,
                 latency_lambda: float = 0.0, budget: int | None = None,
                 rank_cost: CostModel | None = None) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"target must be in (0, 1), got {target}")
        self.gates, self.saliency, self.cost = gates, saliency, cost
        self.rank_cost = cost if rank_cost is None else rank_cost
        self.target, self.prune_per_iter = float(target), int(prune_per_iter)
        self.group_sizes = {**DEFAULT_GROUP_SIZES, **(group_sizes or {})}
        bad = {k: v for k, v in self.group_sizes.items() if k not in KINDS or int(v) < 1}
        if bad:
            raise ValueError(f"group sizes must be positive and for kinds {KINDS}; got {bad}")
        self.latency_lambda = float(latency_lambda)
        self.budget = budget
        self.original = gates.dims
        self.original_cost = float(cost.total(self.original))
        self.min_keep = self._min_keep(self.original)
        self.total_removed = 0
        self.steps = 0

    # ------------------------------------------------------------- state
    def _min_keep(self, d: Dims) -> dict:
        g = self.group_sizes
        return {"emb": min(g["emb"], d.embed_dim),
                "head": [min(g["head"], h) for h in d.num_heads],
                "qk": [min(g["qk"], q) for q in d.qk_dim],
                "v": [min(g["v"], v) for v in d.v_dim],
                "mlp": [min(g["mlp"], m) for m in d.mlp_dim]}

    def widths(self) -> dict:
        return self.gates.widths()

    def current_cost(self) -> float:
        return float(self.cost.total(widths_to_dims(self.widths(), self.original)))

    def ratio(self) -> float:
        return self.current_cost() / self.original_cost

    def minimum_ratio(self) -> float:
        """Cost ratio with every kind at its minimum width: targets below it are unreachable."""
        m = self.min_keep
        w = {"embed_dim": m["emb"], "num_heads": m["head"], "qk_dim": m["qk"],
             "v_dim": m["v"], "mlp_dim": m["mlp"]}
        return self.cost.total(widths_to_dims(w, self.original)) / self.original_cost

    def state_dict(self) -> dict:
        return {"total_removed": self.total_removed, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total_removed = int(state["total_removed"])
        self.steps = int(state["steps"])

    # --------------------------------------------------------- candidates
    def _block_widths(self, w: dict, i: int) -> tuple[int, int, int, int, int]:
        return w["embed_dim"], w["num_heads"][i], w["qk_dim"][i], w["v_dim"][i], w["mlp_dim"][i]

    def _candidate(self, kind: str, block: int | None, scores: dict, w: dict) -> Candidate | None:
        """The lowest-scoring removable group of one kind in one block, or None."""
        c = self._lowest_group(kind, block, scores, w)
        if c is not None and not getattr(self.saliency, "additive", True):
            c.score /= len(c.units)  # per-unit scores: groups of different sizes by their mean
        return c

    def _lowest_group(self, kind: str, block: int | None, scores: dict,
                      w: dict) -> Candidate | None:
        g = self.group_sizes[kind]
        if kind == "emb":
            gate, score = self.gates.emb, scores["emb"]
            live = gate.detach() != 0
            if int(live.sum()) - g < self.min_keep["emb"]:
                return None
            idx = torch.nonzero(live).flatten()
            order = idx[torch.argsort(score[idx], stable=True)[:g]]
            return Candidate(kind, None, order.tolist(), float(score[order].sum()))
        gate = self.gates.blocks[block][kind]
        score = scores["blocks"][block][kind]
        if kind in ("head", "mlp"):
            live = gate.detach() != 0
            if int(live.sum()) - g < self.min_keep[kind][block]:
                return None
            idx = torch.nonzero(live).flatten()
            order = idx[torch.argsort(score[idx], stable=True)[:g]]
            return Candidate(kind, block, order.tolist(), float(score[order].sum()))
        # qk / v: remove g dims from every live head, the lowest-scoring ones of each head
        heads = torch.nonzero(self.gates.blocks[block]["head"].detach() != 0).flatten().tolist()
        width = w["qk_dim" if kind == "qk" else "v_dim"][block]
        if width - g < self.min_keep[kind][block]:
            return None
        units, total = [], 0.0
        for h in heads:
            idx = torch.nonzero(gate[h].detach() != 0).flatten()
            order = idx[torch.argsort(score[h][idx], stable=True)[:g]]
            units += [(h, int(d)) for d in order]
            total += float(score[h][order].sum())
        return Candidate(kind, block, units, total)

    def _cost_drop(self, c: Candidate, w: dict, dims_now: Dims) -> float:
        """What removing `c` saves under the ranking cost, in that cost's lambda unit."""
        g, cost = self.group_sizes[c.kind], self.rank_cost
        scale = COST_UNITS.get(getattr(cost, "name", "latency"), 1.0)
        if c.kind == "emb":
            after = dict(w, embed_dim=w["embed_dim"] - g)
            drop = cost.total(dims_now) - cost.total(widths_to_dims(after, self.original))
            return drop * scale
        E, H, qk, v, m = self._block_widths(w, c.block)
        new = {"head": (E, H - g, qk, v, m), "qk": (E, H, qk - g, v, m),
               "v": (E, H, qk, v - g, m), "mlp": (E, H, qk, v, m - g)}[c.kind]
        return (cost.block(E, H, qk, v, m) - cost.block(*new)) * scale

    def candidates(self, scores: dict) -> list[Candidate]:
        """The lowest-scoring removable group of each kind in each block at the current
        widths (the contenders for the next removal), with cost drop and rank filled."""
        w = self.widths()
        dims_now = widths_to_dims(w, self.original)
        cands = [c for c in [self._candidate("emb", None, scores, w)] +
                 [self._candidate(k, i, scores, w)
                  for i in range(self.original.depth) for k in BLOCK_KINDS]
                 if c is not None]
        for c in cands:
            c.cost_drop = self._cost_drop(c, w, dims_now)
            c.rank = c.score - self.latency_lambda * c.cost_drop
        return cands

    @torch.no_grad()
    def _remove(self, c: Candidate) -> None:
        if c.kind == "emb":
            self.gates.emb[c.units] = 0
            return
        gate = self.gates.blocks[c.block][c.kind]
        if c.kind in ("qk", "v"):
            hs, ds = zip(*c.units)
            gate[list(hs), list(ds)] = 0
        else:
            gate[c.units] = 0

    # ---------------------------------------------------------------- step
    def step(self, model=None, scores: dict | None = None) -> StepResult:
        """One prune step: score (or take `scores` from a `saliency.step` already taken),
        then remove groups until the per-step quota or the target."""
        if scores is None:
            scores = self.saliency.step(model)
        result = StepResult()
        removed_now = 0
        while True:
            if self.current_cost() <= self.target * self.original_cost:
                result.reached = True
                break
            if removed_now >= self.prune_per_iter:
                break
            if self.budget is not None and self.total_removed >= self.budget:
                break
            cands = self.candidates(scores)
            if not cands:
                result.stuck = True
                break
            best = min(cands, key=lambda c: c.rank)  # ties: first in (emb, block order) wins
            self._remove(best)
            n = len(best.units)
            removed_now += n
            self.total_removed += n
            result.removed[best.kind] += n
            result.removed_units.append((best.kind, best.block, best.units))
        self.steps += 1
        result.stuck = self.sync(result.stuck)
        result.cost = self.current_cost()
        result.ratio = result.cost / self.original_cost
        result.reached = result.ratio <= self.target
        result.budget_spent = self.budget is not None and self.total_removed >= self.budget
        return result

    def sync(self, stuck: bool) -> bool:
        """Make rank 0's masks and counters everyone's: a guard against any drift between
        ranks, so that every decision derived from them (stop or go on) is the same."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return stuck
        with torch.no_grad():
            for t in self.gates.tensors():
                dist.broadcast(t.data, src=0)
            counters = torch.tensor([float(stuck), float(self.total_removed)],
                                    dtype=torch.float64, device=self.gates.emb.device)
            dist.broadcast(counters, src=0)
        self.total_removed = int(counters[1].item())
        return bool(counters[0].item())
