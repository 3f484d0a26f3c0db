"""Per-unit importance scores for global structural pruning.

"hessian" (NViT's criterion) scores a unit by `(sum of gate * dL/dgate over the unit / scale)^2`,
a Fisher estimate of the loss increase when the unit is removed: at gate 1 this is the squared
sum of `theta * dL/dtheta` over the unit's producing weights (for a shared QK/V unit, over
every head's Q, or V, weights of that index), squared per batch as the NViT reference does.
The per-kind scales put units of different sizes on one global ranking. "taylor" is the
first-order |.| version; "magnitude" and "random" are baselines. Batch scores are averaged
between pruning steps and smoothed across steps by an EMA, so a ranking does not hinge on
one batch. All scores come in unit shape (see `Gates.to_units`).
"""
from __future__ import annotations

import torch


from .gates import Gates
from .units import KINDS, squared_magnitudes

# the reference's; SigLIP's pool MLP neurons (not in the reference) as the blocks' MLP's
DEFAULT_SCALES = {"emb": 12.0, "head": 12.0, "qk": 2.0, "v": 2.0, "mlp": 1.0, "pool_mlp": 1.0}


class Criterion:
    """How a unit is scored. `needs_gradients`: scores come from gate gradients accumulated
    over batches (then averaged and smoothed by `Saliency`); otherwise `fresh` scores every
    step. `additive`: a group's score is the sum of its units' (an estimate of the loss
    increase); otherwise per-unit scores that groups of different sizes compare by mean."""
    name = ""
    needs_gradients = False
    additive = False

    def batch(self, unit_grads: torch.Tensor) -> torch.Tensor:
        """One batch's score from per-unit `sum(gate * dL/dgate) / scale`."""
        raise NotImplementedError

    def fresh(self, saliency: "Saliency", model: torch.nn.Module | None, alive: list) -> list:
        """Scores computed at the prune step itself, in unit shape."""
        raise NotImplementedError


class Hessian(Criterion):
    """NViT's: the squared sum per batch, a Fisher estimate of the loss increase."""
    name, needs_gradients, additive = "hessian", True, True

    def batch(self, unit_grads: torch.Tensor) -> torch.Tensor:
        return unit_grads.pow(2)


class Taylor(Criterion):
    """First-order: |sum| per batch."""
    name, needs_gradients, additive = "taylor", True, True

    def batch(self, unit_grads: torch.Tensor) -> torch.Tensor:
        return unit_grads.abs()


class Magnitude(Criterion):
    """Weight norms of a unit's producing slices over their layer's live mean (Torch-Pruning's
    "mean" normaliser): raw norms grow with fan-in, so the embedding (read by every block)
    would never be pruned and the widest layers always first."""
    name = "magnitude"

    def fresh(self, saliency: "Saliency", model: torch.nn.Module | None, alive: list) -> list:
        if model is None:
            raise ValueError("Saliency.step: the magnitude criterion needs the model")
        sq = squared_magnitudes(model)
        raw = saliency.gates.to_units(saliency.gates.flatten(sq))
        out = []
        for r, a in zip(raw, alive):
            r = torch.where(a, r.sqrt().to(a.device), torch.zeros_like(r, device=a.device))
            out.append(r / r[a].mean() if bool(a.any()) and r[a].mean() > 0 else r)
        return out


class Random(Criterion):
    """A baseline: the same draw on every rank, a new one at every step."""
    name = "random"

    def fresh(self, saliency: "Saliency", model: torch.nn.Module | None, alive: list) -> list:
        gen = torch.Generator().manual_seed(saliency.seed + saliency.step_index)
        out = []
        for a in alive:
            r = torch.rand(a.shape, generator=gen, dtype=torch.float64).to(a.device)
            out.append(torch.where(a, r, torch.zeros_like(r)))
        return out


CRITERIA_BY_NAME = {c.name: c for c in (Hessian(), Taylor(), Magnitude(), Random())}
CRITERIA = tuple(CRITERIA_BY_NAME)


class Saliency:
    """Running per-unit scores of one criterion over the gates of one model."""

    def __init__(self, gates: Gates, criterion: str = "hessian",
                 scales: dict[str, float] | None = None, momentum: float = 0.9,
                 seed: int = 0) -> None:
        if criterion not in CRITERIA_BY_NAME:
            raise ValueError(f"unknown saliency criterion {criterion!r}; known: {CRITERIA}")
        unknown = set(scales or {}) - set(KINDS)
        if unknown:
            raise ValueError(f"scales for unknown kinds {sorted(unknown)}; known: {KINDS}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.gates = gates
        self.criterion: Criterion = CRITERIA_BY_NAME[criterion]
        self.scales = {**DEFAULT_SCALES, **(scales or {})}
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.step_index = 0
        self.count = 0
        self.sums: list[torch.Tensor] = [self._zeros(u) for u in self._unit_shapes()]
        self.ema: list[torch.Tensor] | None = None

    def _unit_shapes(self) -> list[torch.Tensor]:
        return self.gates.to_units([t.detach() for t in self.gates.tensors()])

    @staticmethod
    def _zeros(t: torch.Tensor) -> torch.Tensor:
        # float64: squared small gradients summed over many batches stay exact enough
        return torch.zeros(t.shape, dtype=torch.float64, device=t.device)

    # ------------------------------------------------------------ per batch
    @torch.no_grad()
    def accumulate(self) -> None:
        """Add this batch's scores from the gates' current .grad (after all_reduce_grads)."""
        if not self.criterion.needs_gradients:
            return
        ts = self.gates.tensors()
        if any(t.grad is None for t in ts):
            raise RuntimeError("Saliency.accumulate: a gate has no gradient; call it after "
                               "loss.backward()")
        units = self.gates.to_units([t.detach().double() * t.grad.double() for t in ts])
        for s, u, kind in zip(self.sums, units, self.gates.kinds()):
            s += self.criterion.batch(u / self.scales[kind])
        self.count += 1

    @torch.no_grad()
    def collect(self, grad_scale: float = 1.0) -> bool:
        """After a training backward: average the gate gradients over ranks, undo the AMP
        loss scale, add them to the scores unless they are non-finite (an fp16 overflow the
        scaler will skip too; one host sync), and clear them. Returns whether they counted."""
        self.gates.all_reduce_grads()
        grads = [t.grad for t in self.gates.tensors()]
        if grad_scale != 1.0:
            torch._foreach_div_(grads, grad_scale)
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            self.accumulate()
        self.gates.zero_grad()
        return finite

    # ------------------------------------------------------------ per step
    @torch.no_grad()
    def step(self, model: torch.nn.Module | None = None) -> dict:
        """Scores for one pruning decision in unit shape, nested like the gates; removed
        units get 0.

        hessian/taylor: batch average since the last step, smoothed by the EMA (the first
        step takes the average as is). magnitude: fresh per-unit weight norms over their layer's
        live mean. random: a fresh draw. Neither uses the EMA.
        """
        alive = self.gates.unit_live()
        if self.criterion.needs_gradients:
            if self.count == 0:
                raise RuntimeError("Saliency.step: no batch was accumulated since the last step")
            avg = [s / self.count for s in self.sums]
            if self.ema is None:
                ema = avg
            else:
                m = self.momentum
                ema = [m * e + (1.0 - m) * a for e, a in zip(self.ema, avg)]
            self.ema = [torch.where(a, e, torch.zeros_like(e)) for e, a in zip(ema, alive)]
            self.sums = [torch.zeros_like(s) for s in self.sums]
            self.count = 0
            flat = [e.clone() for e in self.ema]
        else:
            flat = self.criterion.fresh(self, model, alive)
        self.step_index += 1
        return self.gates.nest(flat)

    def reset_ema(self) -> None:
        """Restart the EMA from zero (not from the next average): the NViT reference
        multiplies its running average by 0 when the loss changes at the first prune step."""
        if self.ema is not None:
            self.ema = [torch.zeros_like(e) for e in self.ema]

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"criterion": self.criterion.name, "step_index": self.step_index, "count": self.count,
                "sums": [s.cpu().clone() for s in self.sums],
                "ema": None if self.ema is None else [e.cpu().clone() for e in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        if state["criterion"] != self.criterion.name:
            raise ValueError(f"saliency state is for criterion {state['criterion']!r}, "
                             f"not {self.criterion.name!r}")
        shapes = self._unit_shapes()
        if len(state["sums"]) != len(shapes) or any(
                tuple(s.shape) != tuple(t.shape) for s, t in zip(state["sums"], shapes)):
            raise ValueError("saliency state does not match the gates' units")
        self.step_index = int(state["step_index"])
        self.count = int(state["count"])
        self.sums = [s.to(device=t.device, dtype=torch.float64).clone()
                     for s, t in zip(state["sums"], shapes)]
        self.ema = None if state["ema"] is None else [
            e.to(device=t.device, dtype=torch.float64).clone() for e, t in zip(state["ema"], shapes)]
