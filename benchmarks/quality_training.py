"""Study 5: training, distillation and finetuning steps the methods share (the pruning loss as
the reference's, with the full model's logits cached per batch)."""
from __future__ import annotations

import contextlib
import io
import math
import time

import torch
import torch.nn.functional as F

import engine
from benchmarks.quality_config import Config
from benchmarks.quality_data import Data, augment
from losses import DistillationLoss, FullModelKLLoss


# ----------------------------------------------------------------------- training
def make_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW without decay on biases, norms and tokens (DeiT's split)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class TeacherCache:
    """Dense-model logits of every train image, plain and flipped, computed once.

    Pruning and finetuning distil from the dense model (KL) on flip-only augmented batches,
    so its logits can be looked up instead of re-running the dense model at every step.
    """

    def __init__(self, dense: torch.nn.Module, x: torch.Tensor, batch: int, flips: bool) -> None:
        self.plain = predict(dense, x, batch)
        self.flipped = predict(dense, x.flip(-1), batch) if flips else None

    def get(self, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        out = self.plain[idx]
        if flip is not None:
            out = torch.where(flip.view(-1, 1), self.flipped[idx], out)
        return out


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return out.float()


def accuracy(model: torch.nn.Module, data: Data, batch: int) -> float:
    logits = predict(model, data.x_val, batch)
    return float((logits.argmax(1) == data.y_val).float().mean() * 100)


CPU = torch.device("cpu")


def run_epochs(model: torch.nn.Module, criterion, next_batch, steps: int, opt, lr: float,
               warmup: int, log: str, per_epoch: int, **hooks) -> None:
    """`steps` training steps through the shipped engine.train_one_epoch, in epochs of
    `per_epoch` batches from `next_batch()`, with a per-step warmup + cosine learning rate."""
    done, epoch, t0 = 0, 0, time.perf_counter()
    while done < steps:
        n = min(per_epoch, steps - done)
        batches = [next_batch() for _ in range(n)]

        def lr_at(i: int, base: int = done) -> None:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(base + i, steps, lr, warmup)
        with contextlib.redirect_stdout(io.StringIO()):
            stats = engine.train_one_epoch(model, criterion, batches, opt, CPU, epoch,
                                           print_freq=10**9, step_update=lr_at, **hooks)
        done += n
        epoch += 1
        print(f"  {log}: step {done}/{steps} loss {stats['loss']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def scratch_batches(data: Data, cfg: Config, gen: torch.Generator, order: dict):
    """Endless augmented training batches in the shuffled `order` ({"perm", "pos"}, updated in
    place so a checkpoint can keep it), reshuffled by `gen` after each pass."""
    n = len(data.x_train)

    def next_batch():
        if order["pos"] + cfg.batch_size > n:
            order["perm"], order["pos"] = torch.randperm(n, generator=gen), 0
        idx = order["perm"][order["pos"]:order["pos"] + cfg.batch_size]
        order["pos"] += cfg.batch_size
        return augment(data.x_train[idx], cfg.crop_pad, cfg.hflip, gen), data.y_train[idx]
    return next_batch


def smoothed_ce(cfg: Config):
    """The dense recipe's loss, in the engine's criterion(samples, outputs, targets) form."""
    def criterion(x, logits, y):
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    return criterion


class DistilBatches:
    """Endless flip-only batches with the dense model's cached logits."""

    def __init__(self, data: Data, teacher: TeacherCache, batch: int, hflip: bool,
                 seed: int) -> None:
        self.data, self.teacher, self.batch, self.hflip = data, teacher, batch, hflip
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(data.x_train), generator=self.gen)
        self.pos = 0

    def per_epoch(self) -> int:
        return len(self.data.x_train) // self.batch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): targets packs the label and the dense model's logits in one
        tensor (label first), which is what the engine hands to `CachedFullModelKL`."""
        if self.pos + self.batch > len(self.perm):
            self.perm = torch.randperm(len(self.data.x_train), generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        x = self.data.x_train[idx]
        flip = None
        if self.hflip:
            flip = torch.rand(len(idx), generator=self.gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        teacher = self.teacher.get(idx, flip)
        return x, torch.cat([self.data.y_train[idx, None].to(teacher.dtype), teacher], 1)


class _CachedLogits(torch.nn.Module):
    """Stands in for the frozen full model: returns the logits the batch brought along."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


class CachedFullModelKL(FullModelKLLoss):
    """The shipped pruning/finetune loss (losses.FullModelKLLoss with the label loss as its
    DeiT loss) taking the full model's logits from the packed targets of `DistilBatches`
    instead of running the dense model again at every step."""

    def __init__(self, cfg: Config, num_classes: int, tau: float, per_head: bool) -> None:
        label_loss = DistillationLoss(torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                                      None, "none", 0.0, 1.0)
        super().__init__(label_loss, _CachedLogits(), cfg.kl_coeff(num_classes),
                         cfg.original_loss_coeff, tau, per_head=per_head)

    def forward(self, inputs: torch.Tensor, outputs, packed: torch.Tensor) -> torch.Tensor:
        self.full_model.logits = packed[:, 1:]
        return super().forward(inputs, outputs, packed[:, 0].long())


def pruning_loss(cfg: Config, num_classes: int) -> CachedFullModelKL:
    """While pruning: KL of the heads' means at T = kl_tau, switched on at the first prune step."""
    return CachedFullModelKL(cfg, num_classes, cfg.kl_tau, per_head=False)


def finetune(model: torch.nn.Module, batches: DistilBatches, cfg: Config, seed: int,
             log: str) -> None:
    """The same finetune for every pruned model, the reference's: KL per head pair at
    T = ft_kl_tau plus the label loss, student in eval mode; AdamW, short warmup + cosine."""
    torch.manual_seed(seed + 1)
    total = max(1, int(round(cfg.ft_epochs * batches.per_epoch())))
    loss = CachedFullModelKL(cfg, model.dims.num_classes, cfg.ft_kl_tau, per_head=True)
    run_epochs(model, loss, batches.next, total,
               make_optimizer(model, cfg.ft_lr, cfg.weight_decay), cfg.ft_lr,
               max(1, int(0.05 * total)), f"{log} finetune", batches.per_epoch(), train_mode=False)
    model.eval()
