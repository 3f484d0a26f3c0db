"""Study 5: pruning quality on real data - NViT's saliency against simpler criteria and Torch-Pruning.

    python -m benchmarks.bench_quality [--data cifar10|digits] [--quick] [--seeds 0,1,2]
        [--methods hessian_macs,...] [--budgets 0.5,0.25] [--keep] [--work-dir DIR]
        [--threads 2] [--dense-only] [--train-only]

One dense DeiT-style model is trained once on real images (CIFAR-10 subset from
../shared/data/cifar10, else scikit-learn's DIGITS) until its top-1 plateaus; a committed
copy under benchmarks/models/ (manifest.json: command, sha256) is used when its recipe
matches, else the work dir's, else it is trained. From the same dense weights every method
reaches 50% and 25% of the dense MACs, once per seed (the seed orders the batches, draws the
random scores and initialises (g)):

  (a) NViT as published: hessian saliency, reference scales, MACs cost
  (b) NViT with a CPU latency table, lambda calibrated at the first prune step
  (c) hessian with unit scales   (d) first-order Taylor   (e) weight magnitude   (f) random
  (g) uniform width scaling trained from scratch for the same total epochs
  (h) Torch-Pruning's ViT recipe (isomorphic global pruning, group Taylor, heads)

(a)-(f) run the shipped pruning loop (pruning.loop.PruningLoop over engine.train_one_epoch)
with the reference's loss (losses.FullModelKLLoss: KL at T=3 from the first prune step,
student in eval mode, constant learning rate), one trajectory through 50% to 25%; every
pruned model, (h) included, gets the same finetune (the reference's: KL per head at T=20 plus
the label loss). Reported per method and budget over the seeds: top-1 after pruning and after
finetuning (mean +- sd), the paired difference to (a) with a 95% t interval, params, MACs and
CPU latency at batch 1 and 32 relative to the dense model (interleaved). Every (method, seed)
is saved when done and every from-scratch epoch is checkpointed, so a stopped study resumes.
Results go to benchmarks/results/quality[_quick].{json,md,*.png}. With --keep a run adds to
the written result (refused unless recipe, threads and dense top-1 match): it keeps its rows
and runs only the asked-for (method, budget, seed) it lacks, so the study can be split over
machines and sessions whose work dirs do not survive; when only (g) runs, the dense weights
are not needed: the dense model's top-1 is the result's, its shape the latency reference.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Spinning OpenMP threads collapse (up to 100x here) when another process shares the cores;
# passive waiting keeps a busy machine's numbers sane. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402
from atomic import save_atomic, write_text_atomic  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS,
    ROOT,
    T_LEVEL,
    interleaved,
    interval_text,
    md_table,
    mean_sd,
    paired_interval,
    pm,
    ratio_stats,
    uniform_dims,
    write_results,
)
from losses import DistillationLoss, FullModelKLLoss  # noqa: E402
from models.flops import count_macs  # noqa: E402
from pruning import Gates, Saliency, compact  # noqa: E402
from pruning.gates import widths_to_dims  # noqa: E402
from pruning.cost import LatencyTable, MacsCost  # noqa: E402
from pruning.loop import PruningLoop  # noqa: E402
from pruning.pruner import GlobalPruner  # noqa: E402

BUDGETS = (0.5, 0.25)
METHODS = {  # key: (label, description); the labels are the issue's, (a) is the reference
    "hessian_macs": ("(a)", "NViT: hessian + MACs"),
    "hessian_latency": ("(b)", "NViT: hessian + latency table"),
    "hessian_unit_macs": ("(c)", "hessian, unit scales + MACs"),
    "taylor_macs": ("(d)", "Taylor + MACs"),
    "magnitude_macs": ("(e)", "magnitude + MACs"),
    "random_macs": ("(f)", "random + MACs"),
    "uniform_scratch": ("(g)", "uniform scaling, from scratch"),
    "torch_pruning": ("(h)", "Torch-Pruning (isomorphic, group Taylor)"),
}
REFERENCE = "hessian_macs"  # every other method is compared with this one, seed by seed
# The reference's commands pass --kl_loss_coeff 100000 on ImageNet's 1000 classes; the KL is an
# element-wise mean over batch x classes, so the same weight relative to the label loss here is
# 100000 x classes / 1000 (100x the batch-mean KL whatever the class count).
REFERENCE_KL_COEFF, REFERENCE_CLASSES = 1e5, 1000
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DIGITS_MEAN, DIGITS_STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)


@dataclass
class Config:
    """Everything that decides the numbers; its dict is stored with the results."""
    data: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    img_size: int = 32
    train_subset: int | None = None  # None: the whole train split
    batch_size: int = 128
    dense_epochs: float = 8
    dense_lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.08
    label_smoothing: float = 0.1
    crop_pad: int = 4
    hflip: bool = True
    # pruning (a)-(e): iterations between prune steps, units removed per step
    prune_batch: int = 64
    prune_lr: float = 3e-4
    interval: int = 10
    prune_per_iter: int = 64
    group_sizes: dict = field(default_factory=lambda: {"emb": 8, "head": 1, "qk": 4, "v": 4,
                                                       "mlp": 8})
    # the reference's loss: KL (T = kl_tau) + original_loss_coeff x label loss; KL weight None:
    # the reference's, scaled to the class count (REFERENCE_KL_COEFF)
    kl_loss_coeff: float | None = None
    original_loss_coeff: float = 1.0
    kl_tau: float = 3.0
    student_eval: bool = True
    latency_weight: float = 1.0  # (b): lambda makes the median penalty this x the median score
    # Torch-Pruning (g)
    tp_steps: int = 40
    tp_ratio: float = 0.8
    tp_head_ratio: float = 0.5
    # finetune of every pruned model: the reference's finetune (KL per head at ft_kl_tau)
    ft_epochs: float = 3
    ft_lr: float = 5e-4
    ft_kl_tau: float = 20.0
    # (g): epochs from scratch (None: dense_epochs + ft_epochs)
    uniform_epochs: float | None = None
    eval_batch: int = 500
    latency_repeats: int = 15
    seed: int = 0  # the dense model's

    def kl_coeff(self, num_classes: int) -> float:
        if self.kl_loss_coeff is not None:
            return self.kl_loss_coeff
        return REFERENCE_KL_COEFF * num_classes / REFERENCE_CLASSES

    def scratch_epochs(self) -> int:
        """(g)'s epochs: the dense model's plus the finetune's (the pruning phase, 0.4-1.3
        epochs of its batches on CIFAR-10, is not counted)."""
        return int(math.ceil(self.uniform_epochs or self.dense_epochs + self.ft_epochs))

    def dims(self, num_classes: int = 10) -> models.Dims:
        return models.Dims.uniform(self.embed_dim, self.depth, self.num_heads, self.mlp_dim,
                                   img_size=self.img_size, patch_size=self.patch_size, in_chans=3,
                                   num_classes=num_classes, distilled=False)

    def dense_key(self) -> dict:
        """The fields the cached dense model depends on."""
        keys = ("data", "embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "img_size",
                "train_subset", "batch_size", "dense_epochs", "dense_lr", "weight_decay",
                "warmup_frac", "label_smoothing", "crop_pad", "hflip", "seed")
        return {k: getattr(self, k) for k in keys}


FULL = dict(embed_dim=128, depth=4, num_heads=4, mlp_dim=256, patch_size=4, dense_epochs=150)
QUICK = dict(embed_dim=48, depth=2, num_heads=3, mlp_dim=96, patch_size=8, batch_size=64,
             dense_epochs=150, dense_lr=3e-3, crop_pad=2, hflip=False, prune_batch=32,
             interval=3, prune_per_iter=24, tp_steps=16, ft_epochs=3, ft_lr=1e-3,
             latency_repeats=6, group_sizes={"emb": 4, "head": 1, "qk": 4, "v": 4, "mlp": 8})


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    """Normalised float images in memory: no loader workers, fast on 2 cores."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    name: str


def _normalise(x: np.ndarray, mean, std) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((t - m) / s).contiguous()


def cifar_dir() -> Path:
    return ROOT.parent / "shared" / "data" / "cifar10"


def load_data(kind: str, img_size: int, train_subset: int | None) -> Data:
    if kind == "cifar10":
        d = cifar_dir()
        tr = np.load(d / "cifar10_train20k.npz")
        va = np.load(d / "cifar10_test10k.npz")
        xt, yt, xv, yv = tr["x_train"], tr["y_train"], va["x_val"], va["y_val"]
        mean, std = CIFAR_MEAN, CIFAR_STD
    else:
        from datasets import _digits_split
        images, targets, tri, vai = _digits_split()
        rgb = np.repeat(images[..., None], 3, axis=-1)  # 8x8 gray -> RGB
        xt, yt, xv, yv = rgb[tri], targets[tri], rgb[vai], targets[vai]
        mean, std = DIGITS_MEAN, DIGITS_STD
    if train_subset:
        xt, yt = xt[:train_subset], yt[:train_subset]
    x_train, x_val = _normalise(xt, mean, std), _normalise(xv, mean, std)
    if x_train.shape[-1] != img_size:
        x_train = F.interpolate(x_train, size=img_size, mode="bilinear", align_corners=False)
        x_val = F.interpolate(x_val, size=img_size, mode="bilinear", align_corners=False)
    return Data(x_train, torch.as_tensor(yt, dtype=torch.long), x_val,
                torch.as_tensor(yv, dtype=torch.long), kind)


def augment(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (zero = the mean after normalising) and horizontal flip."""
    n, _, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        x = torch.stack([xp[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


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


# ------------------------------------------------------------------------- pruning
def prune_ours(dense: models.ReViT, criterion: str, cost_kind: str, batches: DistilBatches,
               cfg: Config, seed: int, table: LatencyTable | None,
               scales: dict | None = None) -> dict:
    """NViT's shipped loop (pruning.loop.PruningLoop over engine.train_one_epoch, the loss,
    pace, student_eval and constant learning rate of the reference) from dense weights
    through every budget; returns compact snapshots. (b) ranks by the latency table, lambda
    calibrated at the first prune step (GlobalPruner.calibrate_lambda), and stops at the
    MACs budget like every other method."""
    torch.manual_seed(seed)
    model = copy.deepcopy(dense).train()
    gates = Gates.attach(model)
    saliency = Saliency(gates, criterion, scales, 0.9, seed)  # None: reference scales
    targets = sorted(BUDGETS, reverse=True)
    pruner = GlobalPruner(gates, saliency, MacsCost(model.dims), targets[0], cfg.prune_per_iter,
                          cfg.group_sizes, rank_cost=table if cost_kind == "latency" else None)
    opt = make_optimizer(model, cfg.prune_lr, cfg.weight_decay)
    out, t0 = {}, time.perf_counter()
    loop = None

    def on_prune(record: dict) -> None:
        for target in record.get("targets_reached", []):
            snap = compact(model).eval()
            Gates.detach_from(snap)
            out[target] = {"model": snap,
                           "iterations": record["epoch"] * per_epoch + record["iteration"],
                           "steps": pruner.steps, "lambda": pruner.latency_lambda,
                           "stuck": loop.stuck, "seconds": time.perf_counter() - t0}
            print(f"  {criterion}+{cost_kind}: {target:.2f} reached after {pruner.steps} "
                  f"steps, MACs ratio {record['ratio']:.3f}"
                  f"{' (STUCK at minimum widths)' if loop.stuck else ''} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    per_epoch = batches.per_epoch()
    loop = PruningLoop(model, gates, saliency, pruner, pruning_loss(cfg, model.dims.num_classes),
                       opt, interval=cfg.interval, iters_per_epoch=per_epoch,
                       student_eval=cfg.student_eval, on_prune=on_prune,
                       later_targets=targets[1:],
                       lambda_weight=cfg.latency_weight if cost_kind == "latency" else None)
    max_epochs = math.ceil(200 * cfg.interval / per_epoch)  # 200 prune steps at most
    for epoch in range(max_epochs):
        if loop.done:
            break
        loop.set_phase()  # as nvit_prune.py, before every epoch
        batch_list = [batches.next() for _ in range(per_epoch)]
        with contextlib.redirect_stdout(io.StringIO()):
            engine.train_one_epoch(model, loop.criterion, batch_list, opt, CPU, epoch,
                                   print_freq=10**9, **loop.hooks(epoch))
    return out


# ------------------------------------------------------------------ Torch-Pruning
def _sync_timm_heads(vit, pruner) -> None:
    """After a Torch-Pruning step the attention modules must learn their new head count."""
    from timm.models.vision_transformer import Attention
    for m in vit.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim


def _skip_headless_steps(pruner) -> None:
    """Work around a Torch-Pruning 1.6.0 bug in global head pruning.

    When a step's scheduled head ratio removes no further head, `_prune` reads an unset
    `head_thres` (UnboundLocalError). Such steps get head ratio 0 instead (no head scope at
    all, which TP handles); the steps that do remove heads keep their scheduled ratio, so the
    head schedule is unchanged.
    """
    total = pruner.initial_total_heads
    ratios = list(pruner.per_step_head_pruning_ratio)
    removed = 0
    for k in range(1, len(ratios)):
        wanted = total - int(total * (1 - ratios[k]))
        if wanted > removed:
            removed = wanted
        else:
            ratios[k] = 0.0
    pruner.per_step_head_pruning_ratio = ratios


def prune_torch_pruning(dense: models.ReViT, batches: DistilBatches, cfg: Config,
                        seed: int) -> dict:
    """Torch-Pruning's documented ViT recipe, iterative, with the same loss between steps as
    ours (the label loss, then the KL term too from the first step on, student in train mode).

    MetaPruner + GroupTaylorImportance, global_pruning with isomorphic scopes, whole heads
    removed (prune_num_heads, head_pruning_ratio) and the embedding, MLP hidden widths;
    the classifier is ignored. Taylor scores use the gradient averaged over the batches
    since the last step. Steps continue until the MACs ratio of the converted model is at or
    below each budget; the optimizer is rebuilt after each step (parameters are replaced).
    """
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    from models.timm_vit import (
        load_nvit,
        nvit_to_timm_vit,
        timm_vit_dims,
        timm_vit_to_nvit,
    )

    torch.manual_seed(seed)
    vit = nvit_to_timm_vit(dense).train()
    loss = pruning_loss(cfg, dense.dims.num_classes)
    macs = MacsCost(dense.dims)
    dense_cost = macs.total(dense.dims)
    num_heads = {m.qkv: m.num_heads for m in vit.modules() if isinstance(m, Attention)}
    example = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            vit, example, importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
            isomorphic=True, pruning_ratio=cfg.tp_ratio, iterative_steps=cfg.tp_steps,
            ignored_layers=[vit.head], num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=cfg.tp_head_ratio, round_to=2)
    _skip_headless_steps(pruner)
    targets = sorted(BUDGETS, reverse=True)
    out, it, t0 = {}, 0, time.perf_counter()
    for step in range(cfg.tp_steps):
        opt = make_optimizer(vit, cfg.prune_lr, cfg.weight_decay)
        params = [p for p in vit.parameters() if p.requires_grad]
        acc = [torch.zeros_like(p) for p in params]

        def accumulate(grad_scale: float) -> None:  # the gradient Taylor scores read
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a += p.grad
        loss.kl_enabled = step > 0
        with contextlib.redirect_stdout(io.StringIO()):
            engine.train_one_epoch(vit, loss, [batches.next() for _ in range(cfg.interval)],
                                   opt, CPU, step, print_freq=10**9, after_backward=accumulate)
        it += cfg.interval
        for a, p in zip(acc, params):
            p.grad = a / cfg.interval
        pruner.step()
        _sync_timm_heads(vit, pruner)
        vit.zero_grad(set_to_none=True)
        ratio = macs.total(timm_vit_dims(vit)) / dense_cost
        while targets and ratio <= targets[0]:
            snap = load_nvit(*timm_vit_to_nvit(vit.eval())).eval()
            vit.train()
            out[targets[0]] = {"model": snap, "iterations": it, "steps": step + 1,
                               "seconds": time.perf_counter() - t0}
            print(f"  torch-pruning: {targets[0]:.2f} reached after {step + 1} steps / {it} "
                  f"iterations, MACs ratio {ratio:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            targets.pop(0)
        if not targets:
            break
    if targets:
        print(f"  torch-pruning: budgets {targets} not reached in {cfg.tp_steps} steps")
    return out


# ---------------------------------------------------------------------- measuring
def latency_vs_dense(model: torch.nn.Module, dense: torch.nn.Module, img: int,
                     repeats: int) -> dict:
    """Latency ratio model/dense at batch 1 and 32: median of interleaved pairs."""
    out = {}
    for b in (1, 32):
        x = torch.randn(b, 3, img, img)
        with torch.inference_mode():
            t = interleaved({"dense": lambda: dense(x), "model": lambda: model(x)},
                            repeats=repeats * (3 if b == 1 else 1), warmup=3,
                            inner=10 if b == 1 else 1)
        out[f"b{b}"] = ratio_stats(t["model"], t["dense"])
        out[f"b{b}"]["dense_ms"] = statistics.median(t["dense"]) * 1e3
    return out


def describe(model: models.ReViT, dense_macs: float) -> dict:
    d = model.dims
    macs = count_macs(model)[0]
    return {"params": sum(p.numel() for p in model.parameters()),
            "macs": macs, "macs_ratio": macs / dense_macs,
            "dims": {"embed_dim": d.embed_dim, "num_heads": d.num_heads, "qk_dim": d.qk_dim,
                     "v_dim": d.v_dim, "mlp_dim": d.mlp_dim}}


def dims_text(d: dict) -> str:
    return (f"E{d['embed_dim']} H{d['num_heads']} qk{d['qk_dim']} v{d['v_dim']} "
            f"mlp{d['mlp_dim']}").replace(" ", "")  # compact for the table


# --------------------------------------------------------------------- caching
PLATEAU_POINTS = 0.5  # converged: the last fifth of the epochs gains less than this


def plateau_gain(curve: list[float]) -> float:
    """Top-1 points gained over the last fifth of the epochs (end minus the value before it)."""
    before = len(curve) - max(1, len(curve) // 5) - 1
    return curve[-1] - (curve[before] if before >= 0 else 0.0)


def train_resumable(dims: models.Dims, cfg: Config, data: Data, epochs: int, seed: int,
                    path: Path, key: dict, label: str) -> dict:
    """A model trained from scratch with the dense recipe (CE with label smoothing, crop +
    flip, AdamW, warmup + cosine), evaluated after every epoch; returns the finished file's
    dict ({"model", "dims", "key", "top1", "seconds", "curve", "plateau_gain"}), reused while
    its `key` matches. Training writes `<stem>.partial.pth` after every epoch (weights,
    optimizer, the batch order's generator and position, the top-1 curve), so a stopped run
    continues exactly where it stopped. Our own loop rather than timm's for that exact resume."""
    partial = path.with_name(path.stem + ".partial.pth")
    if path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("key") == key:
            return ck
        print(f"{label}: {path} was made with another recipe; training again")
    n = len(data.x_train)
    per_epoch = n // cfg.batch_size
    total = epochs * per_epoch
    warmup = max(1, int(cfg.warmup_frac * total))
    torch.manual_seed(seed)
    model = models.ReViT(dims)
    opt = make_optimizer(model, cfg.dense_lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order = {"perm": torch.randperm(n, generator=gen), "pos": 0}
    start, curve, seconds = 0, [], 0.0
    if partial.is_file():
        ck = torch.load(partial, map_location="cpu", weights_only=True)
        if ck.get("key") == key:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            order = {"perm": ck["perm"], "pos": ck["pos"]}
            start, curve, seconds = ck["epoch"] + 1, list(ck["curve"]), ck["seconds"]
            print(f"{label}: continuing {partial} after epoch {start}/{epochs}")

    next_batch, criterion = scratch_batches(data, cfg, gen, order), smoothed_ce(cfg)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        batches = [next_batch() for _ in range(per_epoch)]

        def lr_at(i: int, base: int = epoch * per_epoch) -> None:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(base + i, total, cfg.dense_lr, warmup)
        with contextlib.redirect_stdout(io.StringIO()):
            stats = engine.train_one_epoch(model, criterion, batches, opt, CPU, epoch,
                                           print_freq=10**9, step_update=lr_at)
        curve.append(accuracy(model, data, cfg.eval_batch))
        seconds += time.perf_counter() - t0
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "generator": gen.get_state(), "perm": order["perm"], "pos": order["pos"],
                     "epoch": epoch, "curve": curve, "seconds": seconds, "key": key}, partial)
        print(f"  {label}: epoch {epoch + 1}/{epochs} loss {stats['loss']:.3f} top-1 "
              f"{curve[-1]:.2f}% ({seconds:.0f} s)", flush=True)
    done = {"model": model.state_dict(), "dims": dims.to_dict(), "key": key,
            "top1": curve[-1], "seconds": seconds, "curve": curve,
            "plateau_gain": plateau_gain(curve)}
    save_atomic(done, path)
    partial.unlink(missing_ok=True)
    return done


COMMITTED = ROOT / "benchmarks" / "models"  # small finished dense models, see manifest.json
COMMIT_LIMIT = 1_000_000  # bytes: larger models stay in the work dir (the study retrains them)


def committed_dense(name: str) -> dict | None:
    """A committed dense model's file, checked against the manifest's sha256 (None: none)."""
    import hashlib
    manifest = COMMITTED / "manifest.json"
    if not manifest.is_file():
        return None
    entry = json.loads(manifest.read_text()).get(name)
    path = COMMITTED / name
    if entry is None or not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise SystemExit(f"{path}: sha256 {digest} is not the manifest's {entry['sha256']}; "
                         f"restore it (git checkout) or delete it to train the model again")
    return torch.load(path, map_location="cpu", weights_only=True)


def commit_dense(trained: Path, name: str, command: str, key: dict) -> None:
    """Copy a finished dense model into COMMITTED as `name` and record it in manifest.json
    (sha256, the command that trained it, its top-1, plateau gain and training time)."""
    import hashlib
    import shutil
    present = committed_dense(name)
    if present is not None and present.get("key") == key:
        print(f"{COMMITTED / name} already holds this recipe's model")
        return
    ck = torch.load(trained, map_location="cpu", weights_only=True) if trained.is_file() else {}
    if ck.get("key") != key:
        raise SystemExit(f"no finished dense model of this recipe at {trained} to commit")
    if trained.stat().st_size > COMMIT_LIMIT:
        raise SystemExit(f"{trained} has {trained.stat().st_size:,} bytes, more than the "
                         f"{COMMIT_LIMIT:,} a committed model may have: keep it in the work dir "
                         f"(the study trains it again where it is absent)")
    COMMITTED.mkdir(parents=True, exist_ok=True)
    manifest_path = COMMITTED / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    shutil.copyfile(trained, COMMITTED / f"{name}.tmp")
    os.replace(COMMITTED / f"{name}.tmp", COMMITTED / name)
    manifest[name] = {"sha256": hashlib.sha256((COMMITTED / name).read_bytes()).hexdigest(),
                      "bytes": (COMMITTED / name).stat().st_size, "command": command,
                      "top1": ck["top1"], "epochs": len(ck["curve"]),
                      "plateau_gain": ck["plateau_gain"], "train_seconds": round(ck["seconds"]),
                      "torch": torch.__version__}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    print(f"committed {COMMITTED / name} ({manifest[name]['bytes']:,} bytes)")


def dense_model(cfg: Config, data: Data, work: Path, times: dict,
                committed_name: str | None = None) -> tuple[models.ReViT, float]:
    """The dense model: the committed file `committed_name` when its recipe matches, else the
    work dir's `dense_<data>.pth`, else trained now (resumably, by `train_resumable`) until
    cfg.dense_epochs; the file keeps its top-1 curve and `plateau_gain` (converged when below
    PLATEAU_POINTS)."""
    key = cfg.dense_key()
    epochs = int(cfg.dense_epochs)
    if epochs != cfg.dense_epochs:
        raise SystemExit(f"dense_epochs must be whole epochs, got {cfg.dense_epochs}")
    ck, where = (committed_dense(committed_name) if committed_name else None), "committed"
    if ck is None or ck.get("key") != key:
        where = f"{work}"
        path = work / f"dense_{cfg.data}.pth"
        cached = path.is_file()
        ck = train_resumable(cfg.dims(), cfg, data, epochs, cfg.seed, path, key, "dense")
        where = where if cached else "trained now"
    times["dense_train_s" if where == "trained now" else "dense_train_cached_s"] = ck["seconds"]
    model = models.ReViT(cfg.dims())
    model.load_state_dict(ck["model"])
    gain = ck["plateau_gain"]
    print(f"dense model ({where}): top-1 {ck['top1']:.2f}% after {len(ck['curve'])} epochs "
          f"({ck['seconds']:.0f} s of training); the last fifth gained {gain:.2f} points "
          f"({'converged' if gain < PLATEAU_POINTS else 'NOT converged'})")
    return model.eval(), ck["top1"]


def latency_table(cfg: Config, work: Path, num_tokens: int, times: dict) -> LatencyTable:
    """A small CPU table at this model's token count, batch 32; measured once and cached."""
    path = work / f"latency_table_{cfg.data}.json"
    E, H, hd, M = cfg.embed_dim, cfg.num_heads, cfg.embed_dim // cfg.num_heads, cfg.mlp_dim
    grid = {"--embed-dims": sorted({max(8, E // 8), E // 4, E // 2, 3 * E // 4, E}),
            "--heads": list(range(1, H + 1)),
            "--qk-dims": sorted({4, max(4, hd // 4), hd // 2, hd}),
            "--v-dims": sorted({4, max(4, hd // 4), hd // 2, hd}),
            "--mlp-dims": sorted({8, M // 8, M // 4, M // 2, 3 * M // 4, M})}
    want = {"num_tokens": num_tokens, "batch_size": 32,
            "grid": {k: v for k, v in grid.items()}, "threads": torch.get_num_threads()}
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("meta", {}).get("study_key") == want:
            print(f"latency table: reusing {path}")
            return LatencyTable.from_dict(data)
    from pruning.latency import measure_table
    t0 = time.perf_counter()
    data = measure_table({k.lstrip("-").replace("-", "_"): v for k, v in grid.items()},
                         CPU, 32, num_tokens, warmup=3, repeats=10)
    times["latency_table_s"] = time.perf_counter() - t0
    data["meta"]["study_key"] = want
    table = LatencyTable.from_dict(data)
    write_text_atomic(path, json.dumps(data))
    return table


# ------------------------------------------------------------------------ runs
@dataclass
class Study:
    """What every (method, seed) run shares: the recipe, data, dense model and its logits."""
    cfg: Config
    data: Data
    dense: models.ReViT
    dense_top1: float
    dense_macs: float
    teacher: TeacherCache | None  # None when only (g), which needs no teacher, runs
    table: LatencyTable | None
    work: Path


OURS = {  # method: (criterion, rank cost, scales; None = the reference's)
    "hessian_macs": ("hessian", "macs", None),
    "hessian_latency": ("hessian", "latency", None),
    "hessian_unit_macs": ("hessian", "macs", {"emb": 1.0, "head": 1.0, "qk": 1.0, "v": 1.0,
                                              "mlp": 1.0}),
    "taylor_macs": ("taylor", "macs", None),
    "magnitude_macs": ("magnitude", "macs", None),
    "random_macs": ("random", "macs", None),
}


def measure(s: Study, method: str, budget: float, seed: int, model: models.ReViT,
            top1_pruned: float | None, extra: dict) -> dict:
    """One result row: top-1, params, MACs, dims and CPU latency against the dense model."""
    model = model.eval()
    t1 = time.perf_counter()
    top1 = accuracy(model, s.data, s.cfg.eval_batch)
    eval_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    lat = latency_vs_dense(model, s.dense, s.cfg.img_size, s.cfg.latency_repeats)
    extra = dict(extra)
    times = {**extra.pop("_times", {}), "eval": eval_s, "latency": time.perf_counter() - t1}
    row = {"method": method, "label": METHODS[method][0], "budget": budget, "seed": seed,
           "top1_pruned": top1_pruned, "top1_finetuned": top1,
           **describe(model, s.dense_macs), "latency": lat, **extra, "times_s": times}
    before = "-" if top1_pruned is None else f"{top1_pruned:.2f}%"
    print(f"  -> {METHODS[method][0]} {budget:.2f} seed {seed}: top-1 {before} -> {top1:.2f}%, "
          f"MACs ratio {row['macs_ratio']:.3f}, latency b1 {lat['b1']['median']:.2f} "
          f"b32 {lat['b32']['median']:.2f}", flush=True)
    return row


def finetune_snapshots(s: Study, method: str, seed: int, snaps: dict,
                       budgets: tuple[float, ...]) -> list[dict]:
    """Each of `budgets`' pruned model: top-1, the common finetune, then `measure`."""
    rows = []
    for budget in budgets:
        if budget not in snaps:
            print(f"  {method}: budget {budget} not reached")
            continue
        snap = dict(snaps[budget])
        model = snap.pop("model")
        t1 = time.perf_counter()
        top1_pruned = accuracy(model, s.data, s.cfg.eval_batch)
        ev = time.perf_counter() - t1
        # per seed, the same batches in the same order for every method's finetune
        batches = DistilBatches(s.data, s.teacher, s.cfg.batch_size, s.cfg.hflip, seed + 100)
        t1 = time.perf_counter()
        finetune(model, batches, s.cfg, seed, f"{method} {budget}")
        times = {"prune": snap.pop("seconds", None), "finetune": time.perf_counter() - t1,
                 "eval_pruned": ev}
        rows.append(measure(s, method, budget, seed, model, top1_pruned,
                            {**snap, "_times": times}))
    return rows


def train_uniform(cfg: Config, data: Data, budget: float, seed: int, work: Path) -> dict:
    """(g)'s model at one budget and seed: the dense shape scaled uniformly to `budget` of its
    MACs, trained from scratch by `train_resumable` in `work`. Needs only the dense shape, not
    its weights."""
    dims, epochs = uniform_dims(cfg.dims(), budget), cfg.scratch_epochs()
    key = {**cfg.dense_key(), "dims": dims.to_dict(), "dense_epochs": epochs, "seed": seed}
    return train_resumable(dims, cfg, data, epochs, seed,
                           work / f"uniform_{cfg.data}_{budget}_s{seed}.pth", key,
                           f"uniform {budget} seed {seed}")


def uniform_scratch(s: Study, seed: int, budgets: tuple[float, ...]) -> list[dict]:
    """(g): uniform widths at each budget, trained from scratch (resumably) by the dense recipe
    for the dense model's epochs plus the finetune's."""
    rows, epochs = [], s.cfg.scratch_epochs()
    for budget in budgets:
        ck = train_uniform(s.cfg, s.data, budget, seed, s.work)
        model = models.ReViT(models.Dims.from_dict(ck["dims"]))
        model.load_state_dict(ck["model"])
        rows.append(measure(s, "uniform_scratch", budget, seed, model, None,
                            {"epochs": epochs, "plateau_gain": ck["plateau_gain"],
                             "_times": {"train": ck["seconds"]}}))
    return rows


def run_method(s: Study, method: str, seed: int, threads: int, tag: str = "",
               budgets: tuple[float, ...] = BUDGETS) -> tuple[list[dict], float]:
    """One method at `budgets` for one seed: its rows and the seconds they took. They are
    saved when done and reused by a later run with the same recipe (a stopped study resumes
    here). `tag` names a variant (the lambda sweep's weights) so its rows file is its own."""
    if tuple(budgets) != BUDGETS:
        tag += "_b" + "_".join(f"{b:g}" for b in budgets)
    done = s.work / f"rows_{s.cfg.data}_{method}{tag}_s{seed}.json"
    key = {"config": asdict(s.cfg), "dense_top1": s.dense_top1, "threads": threads, "seed": seed}
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("key") == key:
            print(f"  reusing {done} (measured in an earlier run)")
            return saved["rows"], saved.get("seconds", 0.0)
    t0 = time.perf_counter()
    if method in OURS:
        criterion, cost, scales = OURS[method]
        batches = DistilBatches(s.data, s.teacher, s.cfg.prune_batch, s.cfg.hflip, seed + 10)
        rows = finetune_snapshots(s, method, seed, prune_ours(
            s.dense, criterion, cost, batches, s.cfg, seed, s.table, scales), budgets)
    elif method == "torch_pruning":
        batches = DistilBatches(s.data, s.teacher, s.cfg.prune_batch, s.cfg.hflip, seed + 10)
        rows = finetune_snapshots(s, method, seed,
                                  prune_torch_pruning(s.dense, batches, s.cfg, seed), budgets)
    else:
        rows = uniform_scratch(s, seed, budgets)
    seconds = time.perf_counter() - t0
    write_text_atomic(done, json.dumps({"key": key, "rows": rows, "seconds": seconds}))
    return rows, seconds


def lambda_sweep(s: Study, weights: list[float], seeds: list[int], threads: int) -> list[dict]:
    """(b) at several lambda weights (lambda set at the first prune step so the median latency
    penalty is `weight` x the median score; 0 ranks by saliency alone, i.e. (a)). Each row
    adds the weight and the latency ratio the table predicts for the pruned shape. The
    comparison study's own (b) rows stand for its default weight (same recipe, reused)."""
    rows = []
    for weight in weights:
        sweep = Study(**{**s.__dict__, "cfg": dataclasses.replace(s.cfg, latency_weight=weight)})
        tag = "" if weight == s.cfg.latency_weight else f"_w{weight:g}"
        for seed in seeds:
            print(f"(b) lambda weight {weight:g}, seed {seed}", flush=True)
            rows += [{**r, "latency_weight": weight, "table_latency_ratio": table_ratio(s, r)}
                     for r in run_method(sweep, "hessian_latency", seed, threads, tag=tag)[0]]
    return rows


def reference_rows(s: Study, seeds: list[int], threads: int) -> dict:
    """(a)'s rows per (budget, seed), the sweep's baseline, with the table's latency ratio:
    reused from the comparison study when it ran, pruned here otherwise."""
    return {(r["budget"], r["seed"]): {**r, "table_latency_ratio": table_ratio(s, r)}
            for seed in seeds for r in run_method(s, REFERENCE, seed, threads)[0]}


def table_ratio(s: Study, row: dict) -> float:
    """The latency ratio to the dense model that the latency table predicts for a row's shape."""
    return s.table.total(widths_to_dims(row["dims"], s.dense.dims)) / s.table.total(s.dense.dims)


def lambda_report(rows: list[dict], base: dict, cfg: Config) -> str:
    """Per weight and budget over the seeds: lambda, the shapes, table-predicted and measured
    latency, top-1; and against (a)'s rows of the same seeds (`base`, listed first) whether
    the shape differs and the paired differences in finetuned top-1 and measured latency."""
    headers = ["weight", "budget", "seeds", "lambda", "MACs ratio", "table latency ratio",
               "measured latency/dense b32", "measured b1", "top-1 pruned", "top-1 finetuned",
               "shape differs from (a) (seeds)", "top-1 finetuned − (a) (95% CI)",
               "latency b32 − (a) (95% CI)", "dims (first seed)"]
    groups = [("(a)", list(base.values()))]
    groups += [(f"{w:g}", [r for r in rows if r["latency_weight"] == w])
               for w in sorted({r["latency_weight"] for r in rows})]
    table = []
    for name, group in groups:
        for b in BUDGETS:
            rs = sorted((r for r in group if r["budget"] == b), key=lambda r: r["seed"])
            if not rs:
                continue
            paired = [] if name == "(a)" else [r for r in rs if (b, r["seed"]) in base]
            ref = [base[(b, r["seed"])] for r in paired]
            differs = [r["seed"] for r, a in zip(paired, ref) if r["dims"] != a["dims"]]
            d_top1 = paired_interval([r["top1_finetuned"] - a["top1_finetuned"]
                                      for r, a in zip(paired, ref)])
            d_lat = paired_interval([r["latency"]["b32"]["median"] - a["latency"]["b32"]["median"]
                                     for r, a in zip(paired, ref)])
            table.append([name, f"{b:.2f}", len(rs),
                          f"{statistics.fmean(r['lambda'] for r in rs):.3g}",
                          pm(mean_sd([r["macs_ratio"] for r in rs]), 3),
                          pm(mean_sd([r["table_latency_ratio"] for r in rs]), 3),
                          pm(mean_sd([r["latency"]["b32"]["median"] for r in rs])),
                          pm(mean_sd([r["latency"]["b1"]["median"] for r in rs])),
                          pm(mean_sd([r["top1_pruned"] for r in rs])),
                          pm(mean_sd([r["top1_finetuned"] for r in rs])),
                          f"{len(differs)}/{len(paired)}" if paired else "-",
                          interval_text(d_top1), interval_text(d_lat),
                          dims_text(rs[0]["dims"])])
    return (md_table(headers, table) + "\n\nThe (a) rows are the comparison study's NViT rows "
            "of the same seeds; every other row is (b) (hessian, reference scales, ranked "
            "by score - lambda x the latency-table drop, stopped at the MACs budget) with lambda "
            "set at the first prune step so that the median latency penalty of the next "
            "contenders is `weight` x their median score; weight 0 ranks like (a). The table "
            "predicts from this CPU's latency table (batch 32); measured ratios are medians of "
            "interleaved pairs against the dense model, and differences to (a) are paired by "
            f"seed. Finetune as in the quality study ({cfg.ft_epochs} epochs).")


# ------------------------------------------------------------------------ statistics
def summarise(rows: list[dict]) -> list[dict]:
    """Per method and budget over the seeds: mean +- sd of every figure, and the difference
    to the reference method (a) paired by seed, after pruning and after finetuning."""
    by = {(r["method"], r["budget"], r["seed"]): r for r in rows}
    out = []
    for budget in BUDGETS:
        for method in METHODS:
            rs = sorted((r for r in rows if r["method"] == method and r["budget"] == budget),
                        key=lambda r: r["seed"])
            if not rs:
                continue
            s = {"method": method, "label": METHODS[method][0], "budget": budget,
                 "seeds": [r["seed"] for r in rs], "dims_first_seed": rs[0]["dims"]}
            for f in ("top1_pruned", "top1_finetuned", "macs_ratio", "params"):
                s[f] = mean_sd([r[f] for r in rs])
            for b in ("b1", "b32"):
                s[f"latency_{b}"] = mean_sd([r["latency"][b]["median"] for r in rs])
            if method != REFERENCE:
                for f in ("top1_pruned", "top1_finetuned"):
                    pairs = [(r[f], by[(REFERENCE, budget, r["seed"])][f]) for r in rs
                             if (REFERENCE, budget, r["seed"]) in by]
                    s[f"{f}_vs_reference"] = paired_interval(
                        [a - b for a, b in pairs if a is not None and b is not None])
            out.append(s)
    return out


# ------------------------------------------------------------------------ report
def findings(summary: list[dict], dense_top1: float, n_val: int) -> str:
    """Plain statements computed from the numbers: who wins each budget, and which methods
    the seed-paired intervals separate from NViT as published (a)."""
    lines = []
    ref_label = METHODS[REFERENCE][0]
    for b in BUDGETS:
        cands = [s for s in summary if s["budget"] == b and s["top1_finetuned"] is not None]
        if not cands:
            continue
        best = max(cands, key=lambda s: s["top1_finetuned"]["mean"])
        p = best["top1_finetuned"]["mean"] / 100
        noise = 2 * 100 * math.sqrt(max(p * (1 - p), 1e-4) / n_val)
        lines.append(f"- {int(b * 100)}% MACs: the best mean is {best['label']} "
                     f"{METHODS[best['method']][1]} at {pm(best['top1_finetuned'])}% over "
                     f"{len(best['seeds'])} seed(s) (dense {dense_top1:.2f}%; two standard "
                     f"errors of one evaluation on {n_val} images are about {noise:.1f} points).")
        ref = next((s for s in cands if s["method"] == REFERENCE), None)
        if ref is None:
            continue
        for s in cands:
            iv = s.get("top1_finetuned_vs_reference")
            if s["method"] == REFERENCE or iv is None:
                continue
            name = f"{s['label']} {METHODS[s['method']][1]}"
            if iv["lo"] is None:
                lines.append(f"  - {name}: {iv['mean']:+.2f} points against {ref_label} after "
                             f"finetuning (one seed: no interval yet).")
                continue
            if iv["lo"] > 0:
                verdict = f"BEATS {ref_label}"
            elif iv["hi"] < 0:
                verdict = f"loses to {ref_label}"
            else:
                verdict = f"not separated from {ref_label}"
            lines.append(f"  - {name}: {verdict} (finetuned top-1 difference "
                         f"{interval_text(iv)} points, {int(T_LEVEL * 100)}% interval over "
                         f"{iv['n']} paired seeds).")
        lat = next((s for s in cands if s["method"] == "hessian_latency"), None)
        if lat is not None:
            lines.append(f"  - latency-table ranking (b) vs MACs ranking {ref_label} at batch 32: "
                         f"latency ratio {pm(lat['latency_b32'])} vs {pm(ref['latency_b32'])}, "
                         f"MACs ratio {pm(lat['macs_ratio'], 3)} vs {pm(ref['macs_ratio'], 3)}.")
    return "\n".join(lines)


def plot(summary: list[dict], dense_top1: float, study: str) -> list[str]:
    """Top-1 after finetuning against MACs and against measured latency, mean +- sd bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = dict(zip(METHODS, "osD^vxPh"))
    paths = []
    for key, xlabel, xfield in (
            ("macs", "MACs / dense MACs", "macs_ratio"),
            ("latency", "CPU latency / dense latency (batch 32, median)", "latency_b32")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for m, (label, desc) in METHODS.items():
            pts = sorted((s[xfield]["mean"], s[xfield]["sd"] or 0.0,
                          s["top1_finetuned"]["mean"], s["top1_finetuned"]["sd"] or 0.0)
                         for s in summary if s["method"] == m)
            if pts:
                x, xe, y, ye = zip(*pts)
                ax.errorbar(x, y, xerr=xe, yerr=ye, marker=markers[m], linestyle="-",
                            capsize=3, label=f"{label} {desc}")
        ax.plot([1.0], [dense_top1], marker="*", markersize=12, color="k", linestyle="",
                label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 after finetune (%), mean ± sd over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{study}: accuracy vs {key}")
        path = RESULTS / f"{study}_{key}.png"
        RESULTS.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return paths


def report(rows: list[dict], summary: list[dict], cfg: Config, dense: models.ReViT,
           dense_top1: float, dense_macs: float, times: dict, n_val: int, study: str) -> str:
    ref_label = METHODS[REFERENCE][0]
    headers = ["method", "budget", "seeds", "top-1 pruned", "top-1 finetuned",
               f"finetuned − {ref_label} (95% CI)", f"pruned − {ref_label} (95% CI)", "params",
               "MACs ratio", "latency/dense b1", "latency/dense b32", "dims (first seed)"]
    table = [["dense", "1.00", "", "", f"{dense_top1:.2f}", "", "",
              f"{sum(p.numel() for p in dense.parameters()):,}", "1.000", "1.00", "1.00",
              dims_text(describe(dense, dense_macs)["dims"])]]
    for s in summary:
        table.append([f"{s['label']} {METHODS[s['method']][1]}", f"{s['budget']:.2f}",
                      len(s["seeds"]), pm(s["top1_pruned"]), pm(s["top1_finetuned"]),
                      interval_text(s.get("top1_finetuned_vs_reference")),
                      interval_text(s.get("top1_pruned_vs_reference")),
                      f"{s['params']['mean']:,.0f}", pm(s["macs_ratio"], 3),
                      pm(s["latency_b1"]), pm(s["latency_b32"]), dims_text(s["dims_first_seed"])])
    runs = [[f"{r['label']}", f"{r['budget']:.2f}", r["seed"],
             "-" if r["top1_pruned"] is None else f"{r['top1_pruned']:.2f}",
             f"{r['top1_finetuned']:.2f}", f"{r['macs_ratio']:.3f}",
             f"{r['latency']['b32']['median']:.2f}", dims_text(r["dims"])]
            for r in sorted(rows, key=lambda r: (-r["budget"], list(METHODS).index(r["method"]),
                                                 r["seed"]))]
    design = (
        f"Model: {cfg.depth} blocks, embed {cfg.embed_dim}, {cfg.num_heads} heads, MLP "
        f"{cfg.mlp_dim}, {cfg.img_size} px, patch {cfg.patch_size}; data {cfg.data}. Dense: "
        f"{cfg.dense_epochs} epochs, AdamW lr {cfg.dense_lr}, cosine, label smoothing "
        f"{cfg.label_smoothing}, crop pad {cfg.crop_pad}, flip {cfg.hflip}. (a)-(f): one pruning "
        f"run per seed through 50% to 25% MACs by the shipped PruningLoop, a prune step every "
        f"{cfg.interval} iterations of batch {cfg.prune_batch}, {cfg.prune_per_iter} // 16 "
        f"groups per step (the reference's pace), group sizes {cfg.group_sizes}; loss "
        f"{cfg.original_loss_coeff} x label loss, plus from the first prune step "
        f"{cfg.kl_coeff(dense.dims.num_classes):g} x KL(T={cfg.kl_tau}, element-wise mean) to "
        f"the dense model (the reference's 1e5 on 1000 classes, scaled to the class count); "
        f"student in eval mode from that step ({cfg.student_eval}); constant lr "
        f"{cfg.prune_lr}. (b): lambda set at the first step so the median latency penalty is "
        f"{cfg.latency_weight}x the median score (table: batch 32, this model's tokens). "
        f"(c): the hessian criterion with every per-kind scale 1 instead of 12/12/2/2/1. "
        f"(h): Torch-Pruning MetaPruner + GroupTaylorImportance, global_pruning + isomorphic, "
        f"prune_num_heads (head ratio up to {cfg.tp_head_ratio}), embedding and MLP widths "
        f"(channel ratio up to {cfg.tp_ratio} over {cfg.tp_steps} steps), round_to 2, "
        f"classifier ignored, the same loss between steps. Every pruned model: "
        f"{cfg.ft_epochs} finetune epoch(s), the reference's finetune loss (KL per head at "
        f"T={cfg.ft_kl_tau} x the same coefficient + label loss, student in eval mode), AdamW "
        f"lr {cfg.ft_lr} cosine (flip-only augmentation, dense logits cached). (g): the dense "
        f"recipe from scratch for {cfg.scratch_epochs()} epochs (dense + finetune epochs). "
        f"Seeds order the pruning and finetune batches, draw (f)'s scores and initialise (g); "
        f"the dense model is one (seed {cfg.seed}). Intervals: Student t over the seed-paired "
        f"differences. Latency = model / dense time, median of interleaved pairs, on this CPU.")
    part_times = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items())
    return (md_table(headers, table) + "\n\n## Findings\n\n"
            + findings(summary, dense_top1, n_val)
            + "\n\n## Every run\n\n"
            + md_table(["method", "budget", "seed", "top-1 pruned", "top-1 finetuned",
                        "MACs ratio", "latency/dense b32", "dims"], runs)
            + "\n\n## Design\n\n" + design + "\n\n## Time per part\n\n" + part_times
            + f"\n\nPlots: {', '.join(plot(summary, dense_top1, study))}")


# --------------------------------------------------------------------------- main
def result_to_keep(study: str, cfg: Config, threads: int) -> dict:
    """For --keep: the study's written result, refused unless it used this recipe and thread
    count (its rows would not compare with this run's)."""
    path = RESULTS / f"{study}.json"
    if not path.is_file():
        raise SystemExit(f"--keep: no result at {path} to add to")
    old = json.loads(path.read_text())
    if old.get("config") != asdict(cfg):
        diff = sorted(k for k, v in asdict(cfg).items() if old.get("config", {}).get(k) != v)
        raise SystemExit(f"--keep: {path} used another recipe (differs in {', '.join(diff)})")
    if old["environment"]["threads"] != threads:
        raise SystemExit(f"--keep: {path} ran at {old['environment']['threads']} threads, "
                         f"this run at {threads}: pass --threads {old['environment']['threads']}")
    return old


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["cifar10", "digits"], default=None)
    p.add_argument("--quick", action="store_true", help="tiny DIGITS variant for CI (~3 min)")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "work" / "quality"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 2; 1 with --quick, whose tiny ops gain nothing)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated integers")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS),
                   help="comma-separated subset of the MACs budgets to finetune and measure")
    p.add_argument("--keep", action="store_true",
                   help="add to the existing result (same recipe and threads): keep its rows "
                        "and run only the asked-for rows it lacks")
    p.add_argument("--train-only", action="store_true",
                   help="with --methods uniform_scratch: only train (g)'s models into the work "
                        "dir, write no result (several such runs may share a machine at "
                        "--threads 1 each; a later run without it measures them)")
    p.add_argument("--results-dir", default=None,
                   help="where the JSON/Markdown/PNG go (default benchmarks/results)")
    p.add_argument("--dense-only", action="store_true",
                   help="train (or continue training) the dense model, then stop")
    p.add_argument("--uniform-epochs", type=int, default=None,
                   help="(g)'s epochs from scratch (default: the dense model's + the finetune's, "
                        "the issue's equal total; fewer only to smoke-test)")
    p.add_argument("--lambda-sweep", default=None, metavar="W1,W2,...",
                   help="instead of the comparison: (b) at these lambda weights (0 = (a)), "
                        "written to quality_lambda[_quick]")
    p.add_argument("--save-dense", action="store_true",
                   help="copy the trained dense model into benchmarks/models/ with its "
                        "manifest entry (sha256, this command), to be committed")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_quality " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.results_dir:
        from benchmarks import common
        global RESULTS
        RESULTS = common.RESULTS = Path(args.results_dir)
    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        raise SystemExit("--methods names no method; known: " + ", ".join(METHODS))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds wants comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    try:
        budgets = tuple(b for b in BUDGETS if b in {float(x) for x in args.budgets.split(",")})
    except ValueError:
        budgets = ()
    if len(budgets) != len(args.budgets.split(",")):
        raise SystemExit(f"--budgets wants a comma-separated subset of "
                         f"{','.join(f'{b:g}' for b in BUDGETS)}, got {args.budgets!r}")
    try:
        weights = [float(x) for x in args.lambda_sweep.split(",")] if args.lambda_sweep else []
    except ValueError:
        raise SystemExit(f"--lambda-sweep wants comma-separated numbers, got "
                         f"{args.lambda_sweep!r}") from None
    if args.train_only and methods != ["uniform_scratch"]:
        raise SystemExit("--train-only trains (g)'s models: use it with --methods uniform_scratch")
    modes = [f for f, on in (("--lambda-sweep", args.lambda_sweep),
                             ("--dense-only", args.dense_only), ("--train-only", args.train_only),
                             ("--keep", args.keep)) if on]
    if len(modes) > 1:
        raise SystemExit(f"{' and '.join(modes)} do not combine: choose one")
    if args.lambda_sweep and args.budgets != p.get_default("budgets"):
        raise SystemExit("--lambda-sweep runs every budget: drop --budgets")
    if any(w < 0 for w in weights):
        raise SystemExit("--lambda-sweep weights must be >= 0")
    if "torch_pruning" in methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("torch-pruning is not installed: (h) skipped (pip install -r requirements-bench.txt)")
            methods.remove("torch_pruning")
    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data_kind = args.data
    if data_kind is None:
        if args.quick:
            data_kind = "digits"
        elif (cifar_dir() / "cifar10_train20k.npz").is_file():
            data_kind = "cifar10"
        else:
            data_kind = "digits"
            print(f"note: no CIFAR-10 subset at {cifar_dir()}; using scikit-learn's DIGITS")
    if data_kind == "cifar10" and not (cifar_dir() / "cifar10_train20k.npz").is_file():
        raise SystemExit(f"no CIFAR-10 subset at {cifar_dir()} (see ../shared/data/README); "
                         f"--data digits runs on scikit-learn's DIGITS")
    cfg = Config(data=data_kind, **(QUICK if args.quick else FULL))
    if data_kind == "digits" and not args.quick:
        cfg.crop_pad, cfg.hflip = 2, False  # digits are not mirror-symmetric
    if args.uniform_epochs is not None:
        if args.uniform_epochs < 1:
            raise SystemExit(f"--uniform-epochs must be positive, got {args.uniform_epochs}")
        cfg.uniform_epochs = args.uniform_epochs
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    study = "quality_quick" if args.quick else "quality"
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    data = load_data(data_kind, cfg.img_size, cfg.train_subset)
    times["load_data_s"] = time.perf_counter() - t0
    print(f"data {data_kind}: {len(data.x_train)} train / {len(data.x_val)} val; "
          f"{args.threads} threads; seeds {seeds}")
    if args.train_only:
        for seed in seeds:
            for budget in budgets:
                train_uniform(cfg, data, budget, seed, work)
        return
    old = result_to_keep(study, cfg, args.threads) if args.keep else None
    kept = {(r["method"], r["budget"], r["seed"]): r for r in (old or {}).get("rows", [])}
    todo = {}  # (seed, method): the budgets this run measures
    for seed in seeds:
        for method in methods:
            missing = tuple(b for b in budgets if (method, b, seed) not in kept)
            if missing:
                todo[(seed, method)] = missing
    committed_name = f"{study}_dense_{data_kind}.pth"
    if old is not None and not todo:
        print(f"--keep: {RESULTS / study}.json already has every asked-for row; nothing to run")
        return
    # (g) trains from scratch: with the dense top-1 on record, it needs only the dense shape
    needs_dense = (old is None or args.save_dense
                   or any(method != "uniform_scratch" for _, method in todo))
    if needs_dense:
        dense, dense_top1 = dense_model(cfg, data, work, times, committed_name)
        if old is not None and old["dense"]["top1"] != dense_top1:
            raise SystemExit(f"--keep: the result's dense model had top-1 "
                             f"{old['dense']['top1']}%, this one {dense_top1}%: its rows do not "
                             f"compare with new ones (only (g) can run without it)")
    else:
        dense, dense_top1 = models.ReViT(cfg.dims()).eval(), old["dense"]["top1"]
        print(f"dense model: not loaded, only (g) runs; its top-1 {dense_top1:.2f}% is the "
              f"existing result's, its shape the latency reference")
    if args.save_dense:
        commit_dense(work / f"dense_{data_kind}.pth", committed_name, command, cfg.dense_key())
    if args.dense_only:
        return
    teacher = None
    if needs_dense:
        t0 = time.perf_counter()
        teacher = TeacherCache(dense, data.x_train, cfg.eval_batch, cfg.hflip)
        times["teacher_logits_s"] = time.perf_counter() - t0
    table = None
    if any(m == "hessian_latency" for _, m in todo) or weights:
        table = latency_table(cfg, work, dense.dims.num_tokens, times)
    s = Study(cfg, data, dense, dense_top1, count_macs(dense)[0], teacher, table, work)
    if weights:
        rows = lambda_sweep(s, weights, seeds, args.threads)
        base = reference_rows(s, seeds, args.threads)
        times["total_s"] = time.perf_counter() - t_start
        name = study.replace("quality", "quality_lambda")
        path = write_results(name, {"config": asdict(cfg), "data": data_kind, "seeds": seeds,
                                    "weights": weights, "dense_top1": dense_top1, "rows": rows,
                                    "reference_rows": list(base.values()),
                                    "times_s": times}, lambda_report(rows, base, cfg))
        print(path.read_text())
        return

    if old is not None:
        print(f"--keep: keeping the result's {len(kept)} rows, running "
              f"{sum(map(len, todo.values()))} more")
    # seed-major: a stopped study has every method at its first seeds
    for (seed, method), missing in todo.items():
        print(f"{METHODS[method][0]} {METHODS[method][1]}, seed {seed}", flush=True)
        done, seconds = run_method(s, method, seed, args.threads, budgets=missing)
        kept.update({(r["method"], r["budget"], r["seed"]): r for r in done})
        times[f"{method}_s"] = times.get(f"{method}_s", 0.0) + seconds
    rows = list(kept.values())
    seeds = sorted({r["seed"] for r in rows})

    times["total_s"] = time.perf_counter() - t_start
    summary = summarise(rows)
    md = report(rows, summary, cfg, dense, dense_top1, s.dense_macs, times, len(data.x_val),
                study)
    result = {"config": asdict(cfg), "data": data_kind, "n_train": len(data.x_train),
              "n_val": len(data.x_val), "seeds": seeds,
              "dense": {"top1": dense_top1, "macs": s.dense_macs,
                        "params": sum(p.numel() for p in dense.parameters()),
                        "dims": dense.dims.to_dict()},
              "methods": {k: v[1] for k, v in METHODS.items()}, "budgets": list(BUDGETS),
              "summary": summary, "rows": rows, "times_s": times}
    if old is not None:  # where and in how long the kept rows were measured
        result["earlier_runs"] = old.get("earlier_runs", []) + [
            {"environment": old["environment"], "times_s": old["times_s"]}]
    path = write_results(study, result, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
