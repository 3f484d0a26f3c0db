"""The NViT pruning schedule as one object, driven by `engine.train_one_epoch`'s hooks.

`PruningLoop` owns everything that happens around the training steps of a pruning run:
collecting the saliency after each backward, a prune step in the iteration after every
`interval`-th one (the NViT reference's timing), the switch at the first prune step (KL
term on, EMA restarted, the student in eval mode with `student_eval`), clearing the
optimizer state of removed weights, moving on to the next of several targets, when the run
is done (last target reached, nothing left to remove, budget spent), a history of every
prune step, when a resumable state is due, and a requested stop. It knows nothing of files
or flags: the caller's `on_prune(record)` prints and saves.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from .gates import Gates
from .pruner import GlobalPruner
from .saliency import Saliency
from .units import clear_pruned_state


class PruningLoop:
    def __init__(self, model: torch.nn.Module, gates: Gates, saliency: Saliency,
                 pruner: GlobalPruner, criterion, optimizer: torch.optim.Optimizer, *,
                 interval: int, iters_per_epoch: int, student_eval: bool = False,
                 train_module: torch.nn.Module | None = None,
                 save_every_steps: int = 0, save_every_seconds: float = 0.0,
                 on_prune: Callable[[dict], None] | None = None,
                 lambda_weight: float | None = None, later_targets: tuple[float, ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        """lambda_weight: at the first prune step, set the pruner's lambda by
        `GlobalPruner.calibrate_lambda` with this weight (None: keep the given lambda).
        later_targets: smaller cost ratios to go on pruning toward once the pruner's target is
        reached, in order; the run is done at the last (several targets in one run)."""
        if interval < 1 or iters_per_epoch < 1:
            raise ValueError("the prune interval and the iterations per epoch must be positive")
        self.model, self.gates, self.saliency, self.pruner = model, gates, saliency, pruner
        self.criterion, self.optimizer = criterion, optimizer
        self.train_module = train_module if train_module is not None else model
        self.interval, self.iters_per_epoch = int(interval), int(iters_per_epoch)
        self.student_eval = bool(student_eval)
        self.save_every_steps, self.save_every_seconds = int(save_every_steps), float(save_every_seconds)
        self.on_prune = on_prune
        self.lambda_weight = lambda_weight
        self.clock = clock
        targets = [pruner.target, *later_targets]
        if any(not 0.0 < b < a for a, b in zip(targets, targets[1:])):
            raise ValueError(f"several targets must decrease and stay above 0, got {targets}")
        # resumable state
        self.later_targets = [float(t) for t in later_targets]
        self.epoch, self.iteration = 0, 0  # where training continues
        self.done, self.stuck = False, False
        self.history: list[dict] = []
        # per process
        self.stop_requested = False
        self._losses: dict[str, list[float]] = {}
        self._last_step_time = clock()
        self._last_save_step, self._last_save_time = 0, clock()
        if not saliency.criterion.needs_gradients:
            self._freeze()

    # ------------------------------------------------------------------ phases
    @property
    def pruning_started(self) -> bool:
        return self.pruner.steps > 0

    @property
    def train_mode(self) -> bool:
        """Whether the student trains in train mode (dropout, drop-path) right now."""
        return not (self.pruning_started and self.student_eval)

    def set_phase(self) -> None:
        """Before the first prune step: the base loss only, train mode. From it on: the KL
        term, and with student_eval the student in eval mode (both heads still returned)."""
        if hasattr(self.criterion, "kl_enabled"):
            self.criterion.kl_enabled = self.pruning_started
        self.model.return_pair = not self.train_mode
        self.train_module.train(self.train_mode)

    def _freeze(self) -> None:
        """No more gate gradients: pruning is over, or the criterion does not use them."""
        for t in self.gates.tensors():
            t.requires_grad_(False)
            t.grad = None

    # ------------------------------------------------------------ engine hooks
    def after_backward(self, grad_scale: float) -> None:
        if not self.done and self.saliency.criterion.needs_gradients:
            self.saliency.collect(grad_scale)

    def hooks(self, epoch: int) -> dict:
        """Keyword arguments for `engine.train_one_epoch` in this epoch."""
        return {"after_backward": self.after_backward,
                "after_step": lambda i, losses: self.after_step(epoch, i, losses),
                "train_mode": self.train_mode,
                "stop_requested": lambda: self.stop_requested}

    def after_step(self, epoch: int, i: int, losses: dict[str, float]) -> bool:
        """After optimizer step i of `epoch`; True ends the epoch (done). A stop request ends
        it in the engine, agreed on by every rank in the step's all-reduce."""
        self.epoch, self.iteration = (epoch, i + 1) if i + 1 < self.iters_per_epoch else (epoch + 1, 0)
        for k, v in losses.items():
            self._losses.setdefault(k, []).append(v)
        global_iter = epoch * self.iters_per_epoch + i
        # the reference prunes in the iteration after every interval-th one
        due = not self.done and global_iter > 0 and global_iter % self.interval == 0
        if due:
            self.prune_step(epoch, i)
        return self.done

    def request_stop(self, signum=None, frame=None) -> None:
        """A signal handler (Ctrl-C, SIGTERM): this process asks to stop after its step."""
        self.stop_requested = True

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop; every rank gets the same answer (a collective)."""
        self.stop_requested = _any_rank(self.stop_requested)
        return self.stop_requested

    # --------------------------------------------------------------- prune step
    def prune_step(self, epoch: int, i: int) -> dict | None:
        if self.saliency.criterion.needs_gradients and self.saliency.count == 0:
            print(f"prune step postponed at iteration {i + 1}: no batch with finite gradients")
            return None
        scores = self.saliency.step(self.model)
        if self.lambda_weight is not None and self.pruner.steps == 0:
            self.pruner.calibrate_lambda(scores, self.lambda_weight)
        result = self.pruner.step(self.model, scores)
        clear_pruned_state(self.optimizer, self.model, result.removed_units)
        if self.pruner.steps == 1:  # the loss changes here: the reference restarts its EMA
            self.saliency.reset_ema()
            self.set_phase()
        now = self.clock()
        means = {k: sum(v) / len(v) for k, v in self._losses.items() if v}
        self._losses = {}
        record = {"step": self.pruner.steps, "epoch": epoch, "iteration": i + 1,
                  "ratio": result.ratio, "removed_groups": result.removed,
                  "dims": self.gates.widths(), "seconds": now - self._last_step_time,
                  "lr": self.optimizer.param_groups[0]["lr"], **means}
        self._last_step_time = now
        reached = self._pass_targets(result)
        if reached:
            record["targets_reached"] = reached
        self.history.append(record)
        self.done = result.reached or result.stuck or result.budget_spent
        self.stuck = result.stuck
        if self.done:
            self._freeze()
        if self.on_prune is not None:
            self.on_prune(record)
        return record

    def _pass_targets(self, result) -> list[float]:
        """The targets this step reached (one step can pass several); with targets left and
        units to remove, the pruner moves on to the next and the result is not `reached`."""
        if not result.reached:
            return []
        reached = [self.pruner.target]
        while self.later_targets and result.ratio <= self.later_targets[0]:
            reached.append(self.later_targets.pop(0))
        if self.later_targets and not (result.stuck or result.budget_spent):
            self.pruner.target = self.later_targets.pop(0)
            result.reached = False
        return reached

    # ------------------------------------------------------------------ saving
    def save_due(self) -> bool:
        """A resumable state is due: the run is done or stopping, or the cadence says so."""
        if self.done or self.stop_requested:
            return True
        steps = self.pruner.steps - self._last_save_step
        if self.save_every_steps and steps >= self.save_every_steps:
            return True
        return bool(self.save_every_seconds and steps
                    and self.clock() - self._last_save_time >= self.save_every_seconds)

    def mark_saved(self) -> None:
        self._last_save_step, self._last_save_time = self.pruner.steps, self.clock()

    def state_dict(self) -> dict:
        return {"masks": self.gates.state_dict(), "saliency": self.saliency.state_dict(),
                "pruner": self.pruner.state_dict(), "epoch": self.epoch,
                "iteration": self.iteration, "done": self.done, "stuck": self.stuck,
                "history": list(self.history),
                "targets": [self.pruner.target, *self.later_targets],
                # the losses since the last prune step, whose means the next record logs
                "pending_losses": {k: list(v) for k, v in self._losses.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.gates.load_state_dict(state["masks"])
        self.saliency.load_state_dict(state["saliency"])
        self.pruner.load_state_dict(state["pruner"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.done, self.stuck = bool(state["done"]), bool(state["stuck"])
        self.history = list(state["history"])
        if "targets" in state:  # the targets not yet reached (states before several targets: one)
            self.pruner.target, *self.later_targets = (float(t) for t in state["targets"])
        self._losses = {k: list(v) for k, v in state.get("pending_losses", {}).items()}
        self._last_save_step = self.pruner.steps
        if self.done:
            self._freeze()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool) -> bool:
    if not _distributed():
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
