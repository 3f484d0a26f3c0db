"""Study 5: pruning quality on real data - NViT's saliency against simpler criteria and Torch-Pruning.

    python -m benchmarks.bench_quality [--data cifar10|digits] [--quick] [--work-dir DIR] [--threads 2]

One dense DeiT-style model is trained once on real images (CIFAR-10 subset from
../shared/data/cifar10, else scikit-learn's DIGITS) and cached in the work dir. From the
same dense weights every method reaches 50% and 25% of the dense MACs:

  (a) hessian saliency + MACs cost          (NViT as published, our default)
  (b) hessian saliency + CPU latency table  (ranked by score - lambda * latency drop)
  (c) first-order Taylor + MACs   (d) weight magnitude + MACs   (e) random + MACs
  (f) uniform width scaling to the MACs budget, trained from scratch
  (g) Torch-Pruning (group Taylor, global/isomorphic, heads + embedding) on the timm ViT

(a)-(e) run the real pruning loop (gates, KL to the dense model between prune steps, one
trajectory through 50% to 25%); every pruned model, (g) included, gets the same finetune.
Reported: top-1 after pruning and after finetuning, params, MACs, CPU latency at batch 1 and
32 relative to the dense model (interleaved), and the final dims. Results go to
benchmarks/results/quality[_quick].{json,md,*.png}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import statistics
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
    interleaved,
    md_table,
    ratio_stats,
    uniform_dims,
    write_results,
)
from losses import kl_elementwise_mean  # noqa: E402
from models.flops import count_macs  # noqa: E402
from pruning import Gates, Saliency, compact  # noqa: E402
from pruning.cost import LatencyTable, MacsCost  # noqa: E402
from pruning.loop import PruningLoop  # noqa: E402
from pruning.pruner import GlobalPruner  # noqa: E402

BUDGETS = (0.5, 0.25)
METHODS = {  # key: (label, description)
    "hessian_macs": ("(a)", "hessian + MACs (NViT)"),
    "hessian_latency": ("(b)", "hessian + latency table"),
    "taylor_macs": ("(c)", "taylor + MACs"),
    "magnitude_macs": ("(d)", "magnitude + MACs"),
    "random_macs": ("(e)", "random + MACs"),
    "uniform_scratch": ("(f)", "uniform scaling, from scratch"),
    "torch_pruning": ("(g)", "Torch-Pruning (group Taylor)"),
    "hessian_unit_macs": ("(h)", "hessian, all scales 1 + MACs"),  # diagnostic: scale factors
}
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
    kl_coeff: float = 1.0
    latency_weight: float = 1.0  # (b): lambda makes the median penalty this x the median score
    # Torch-Pruning (g)
    tp_steps: int = 40
    tp_ratio: float = 0.8
    tp_head_ratio: float = 0.5
    # finetune of every pruned model
    ft_epochs: float = 1
    ft_lr: float = 5e-4
    # (f): epochs from scratch (None: dense_epochs + ft_epochs)
    uniform_epochs: float | None = None
    eval_batch: int = 500
    latency_repeats: int = 15
    seed: int = 0

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
             dense_epochs=25, dense_lr=3e-3, crop_pad=2, hflip=False, prune_batch=32,
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


def train_scratch(model: torch.nn.Module, data: Data, cfg: Config, epochs: float, seed: int,
                  log: str) -> None:
    """The dense recipe: CE with label smoothing, crop + flip, AdamW, warmup + cosine."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(data.x_train)
    steps_per_epoch = n // cfg.batch_size
    total = max(1, int(round(epochs * steps_per_epoch)))
    next_batch = scratch_batches(data, cfg, gen, {"perm": torch.randperm(n, generator=gen), "pos": 0})
    run_epochs(model, smoothed_ce(cfg), next_batch, total, make_optimizer(model, cfg.dense_lr, cfg.weight_decay),
               cfg.dense_lr, max(1, int(cfg.warmup_frac * total)), log, steps_per_epoch)


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
        tensor (label first), which is what the engine hands to `distil_loss`."""
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


def distil_loss(cfg: Config):
    """KL to the dense model plus label-smoothed CE: the pruning and finetune objective, as an
    engine criterion over the packed targets of `DistilBatches`."""
    def loss(x: torch.Tensor, logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        y, teacher = packed[:, 0].long(), packed[:, 1:]
        # the study's KL weight was set for a batch-mean KL: times the classes, the element-wise
        # mean is that (T = 1); study 5 predates the reference's KL scale (issue 13 redoes it)
        return (cfg.kl_coeff * logits.shape[-1] * kl_elementwise_mean(logits, teacher, 1.0)
                + F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
    return loss


def finetune(model: torch.nn.Module, batches: DistilBatches, cfg: Config, log: str) -> None:
    """The same finetune for every pruned model: KL + CE, AdamW, short warmup + cosine."""
    torch.manual_seed(cfg.seed + 1)
    total = max(1, int(round(cfg.ft_epochs * batches.per_epoch())))
    run_epochs(model, distil_loss(cfg), batches.next, total,
               make_optimizer(model, cfg.ft_lr, cfg.weight_decay), cfg.ft_lr,
               max(1, int(0.05 * total)), f"{log} finetune", batches.per_epoch())
    model.eval()


# ------------------------------------------------------------------------- pruning
def prune_ours(dense: models.ReViT, criterion: str, cost_kind: str, batches: DistilBatches,
               data: Data, cfg: Config, table: LatencyTable | None,
               scales: dict | None = None) -> dict:
    """NViT's shipped loop (pruning.loop.PruningLoop over engine.train_one_epoch) from dense
    weights through every budget; returns compact snapshots. (b) ranks by the latency table,
    lambda calibrated at the first prune step (GlobalPruner.calibrate_lambda), and stops at
    the MACs budget like every other method."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(dense).train()
    gates = Gates.attach(model)
    saliency = Saliency(gates, criterion, scales, 0.9, cfg.seed)  # None: reference scales
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
    loop = PruningLoop(model, gates, saliency, pruner, distil_loss(cfg), opt,
                       interval=cfg.interval, iters_per_epoch=per_epoch, on_prune=on_prune,
                       later_targets=targets[1:],
                       lambda_weight=cfg.latency_weight if cost_kind == "latency" else None)
    max_epochs = math.ceil(200 * cfg.interval / per_epoch)  # 200 prune steps at most
    for epoch in range(max_epochs):
        if loop.done:
            break
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


def prune_torch_pruning(dense: models.ReViT, batches: DistilBatches, cfg: Config) -> dict:
    """Torch-Pruning's documented ViT recipe, iterative, with the same KL training between steps.

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

    torch.manual_seed(cfg.seed)
    vit = nvit_to_timm_vit(dense).train()
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
        with contextlib.redirect_stdout(io.StringIO()):
            engine.train_one_epoch(vit, distil_loss(cfg), [batches.next() for _ in range(cfg.interval)],
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


# ----------------------------------------------------------------- uniform scaling
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


def dense_model(cfg: Config, data: Data, work: Path, times: dict) -> tuple[models.ReViT, float]:
    """The dense model, trained once with the dense recipe and evaluated after every epoch;
    reused while its recipe matches. Training writes `dense_<data>.partial.pth` after every
    epoch (weights, optimizer, the batch order's generator and position, the top-1 curve),
    so a stopped run continues exactly where it stopped; the finished model keeps its curve
    and `plateau_gain` (converged when below PLATEAU_POINTS)."""
    path, partial = work / f"dense_{cfg.data}.pth", work / f"dense_{cfg.data}.partial.pth"
    key = cfg.dense_key()
    model = models.ReViT(cfg.dims())
    if path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("key") == key:
            model.load_state_dict(ck["model"])
            print(f"dense model: reusing {path} (top-1 {ck['top1']:.2f}%, plateau gain "
                  f"{ck.get('plateau_gain', float('nan')):.2f} points, trained in "
                  f"{ck['seconds']:.0f} s)")
            times["dense_train_cached_s"] = ck["seconds"]
            return model.eval(), ck["top1"]
        print(f"dense model: {path} was made with another recipe; training again")
    epochs = int(cfg.dense_epochs)
    if epochs != cfg.dense_epochs:
        raise SystemExit(f"dense_epochs must be whole epochs, got {cfg.dense_epochs}")
    n = len(data.x_train)
    per_epoch = n // cfg.batch_size
    total = epochs * per_epoch
    warmup = max(1, int(cfg.warmup_frac * total))
    torch.manual_seed(cfg.seed)
    model = models.ReViT(cfg.dims())
    opt = make_optimizer(model, cfg.dense_lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
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
            print(f"dense model: continuing {partial} after epoch {start}/{epochs}")

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
        print(f"  dense: epoch {epoch + 1}/{epochs} loss {stats['loss']:.3f} top-1 "
              f"{curve[-1]:.2f}% ({seconds:.0f} s)", flush=True)
    top1, gain = curve[-1], plateau_gain(curve)
    times["dense_train_s"] = seconds
    save_atomic({"model": model.state_dict(), "dims": model.dims.to_dict(), "key": key,
                 "top1": top1, "seconds": seconds, "curve": curve, "plateau_gain": gain}, path)
    partial.unlink(missing_ok=True)
    print(f"dense model: top-1 {top1:.2f}% after {epochs} epochs in {seconds:.0f} s; the last "
          f"fifth gained {gain:.2f} points ({'converged' if gain < PLATEAU_POINTS else 'NOT converged'})")
    return model.eval(), top1


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


# ------------------------------------------------------------------------ report
def findings(rows: list[dict], dense_top1: float, n_val: int) -> str:
    """Plain statements computed from the numbers: who wins each budget, where ours loses."""
    lines = []
    by = {(r["method"], r["budget"]): r for r in rows}
    for b in BUDGETS:
        cands = [r for r in rows if r["budget"] == b and r.get("top1_finetuned") is not None]
        if not cands:
            continue
        best = max(cands, key=lambda r: r["top1_finetuned"])
        p = best["top1_finetuned"] / 100
        noise = 2 * 100 * math.sqrt(max(p * (1 - p), 1e-4) / n_val)
        lines.append(f"- {int(b * 100)}% MACs: best is {METHODS[best['method']][0]} "
                     f"{METHODS[best['method']][1]} at {best['top1_finetuned']:.2f}% "
                     f"(dense {dense_top1:.2f}%); two standard errors on {n_val} val images "
                     f"are about {noise:.1f} points.")
        ours = by.get(("hessian_macs", b))
        if ours is None:
            continue
        beaten = [r for r in cands if r["method"] != "hessian_macs"
                  and r["top1_finetuned"] > ours["top1_finetuned"]]
        for r in sorted(beaten, key=lambda r: -r["top1_finetuned"]):
            gap = r["top1_finetuned"] - ours["top1_finetuned"]
            where = "within noise" if gap < noise else "beyond noise"
            lines.append(f"  - NViT's hessian + MACs ({ours['top1_finetuned']:.2f}%) LOSES to "
                         f"{METHODS[r['method']][0]} {METHODS[r['method']][1]} "
                         f"({r['top1_finetuned']:.2f}%, +{gap:.2f} points, {where}).")
        if not beaten:
            lines.append(f"  - NViT's hessian + MACs ({ours['top1_finetuned']:.2f}%) is not "
                         f"beaten by any other method here.")
        tp_row = by.get(("torch_pruning", b))
        if tp_row is not None and tp_row.get("top1_pruned") is not None:
            lines.append(f"  - right after pruning (before finetune): hessian + MACs "
                         f"{ours['top1_pruned']:.2f}% vs Torch-Pruning {tp_row['top1_pruned']:.2f}%.")
        lat = by.get(("hessian_latency", b))
        if lat is not None:
            lines.append(f"  - latency-table ranking vs MACs ranking at batch 32: latency ratio "
                         f"{lat['latency']['b32']['median']:.2f} vs "
                         f"{ours['latency']['b32']['median']:.2f}, top-1 "
                         f"{lat['top1_finetuned']:.2f}% vs {ours['top1_finetuned']:.2f}%.")
    return "\n".join(lines)


def plot(rows: list[dict], dense_top1: float, study: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = dict(zip(METHODS, "osD^vxPh"))
    paths = []
    for key, xlabel, xget in (
            ("macs", "MACs / dense MACs", lambda r: r["macs_ratio"]),
            ("latency", "CPU latency / dense latency (batch 32, median)",
             lambda r: r["latency"]["b32"]["median"])):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for m, (label, desc) in METHODS.items():
            pts = sorted((xget(r), r["top1_finetuned"]) for r in rows if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker=markers[m], linestyle="-", label=f"{label} {desc}")
        ax.plot([1.0], [dense_top1], marker="*", markersize=12, color="k", linestyle="",
                label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 after finetune (%)")
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


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["cifar10", "digits"], default=None)
    p.add_argument("--quick", action="store_true", help="tiny DIGITS variant for CI (~2-3 min)")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "work" / "quality"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 2; 1 with --quick, whose tiny ops gain nothing)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--results-dir", default=None,
                   help="where the JSON/Markdown/PNG go (default benchmarks/results)")
    p.add_argument("--dense-only", action="store_true",
                   help="train (or continue training) the dense model, then stop")
    args = p.parse_args(argv)
    if args.results_dir:
        from benchmarks import common
        global RESULTS
        RESULTS = common.RESULTS = Path(args.results_dir)
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
    cfg = Config(data=data_kind, **(QUICK if args.quick else FULL))
    if data_kind == "digits" and not args.quick:
        cfg.crop_pad, cfg.hflip = 2, False  # digits are not mirror-symmetric
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    study = "quality_quick" if args.quick else "quality"
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    data = load_data(data_kind, cfg.img_size, cfg.train_subset)
    times["load_data_s"] = time.perf_counter() - t0
    print(f"data {data_kind}: {len(data.x_train)} train / {len(data.x_val)} val; "
          f"{args.threads} threads")
    dense, dense_top1 = dense_model(cfg, data, work, times)
    if args.dense_only:
        return
    dense_macs = count_macs(dense)[0]

    t0 = time.perf_counter()
    teacher = TeacherCache(dense, data.x_train, cfg.eval_batch, cfg.hflip)
    times["teacher_logits_s"] = time.perf_counter() - t0
    table = None
    if "hessian_latency" in methods:
        table = latency_table(cfg, work, dense.dims.num_tokens, times)

    rows: list[dict] = []

    def record(method: str, budget: float, model: models.ReViT, top1_pruned: float | None,
               extra: dict, prune_s: float | None) -> None:
        model = model.eval()
        t1 = time.perf_counter()
        top1_ft = accuracy(model, data, cfg.eval_batch)
        eval_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        lat = latency_vs_dense(model, dense, cfg.img_size, cfg.latency_repeats)
        lat_s = time.perf_counter() - t1
        extra = dict(extra)
        part_times = {"prune": prune_s, **extra.pop("_times", {}), "eval": eval_s,
                      "latency": lat_s}
        row = {"method": method, "label": METHODS[method][0], "budget": budget,
               "top1_pruned": top1_pruned, "top1_finetuned": top1_ft,
               **describe(model, dense_macs), "latency": lat, **extra, "times_s": part_times}
        rows.append(row)
        before = "-" if top1_pruned is None else f"{top1_pruned:.2f}%"
        print(f"  -> {METHODS[method][0]} {budget:.2f}: top-1 {before} -> {top1_ft:.2f}%, MACs ratio {row['macs_ratio']:.3f}, latency b1 "
              f"{lat['b1']['median']:.2f} b32 {lat['b32']['median']:.2f}", flush=True)

    def finish(method: str, snaps: dict) -> None:
        for budget in BUDGETS:
            if budget not in snaps:
                print(f"  {method}: budget {budget} not reached")
                continue
            s = snaps[budget]
            model = s.pop("model")
            t1 = time.perf_counter()
            top1_pruned = accuracy(model, data, cfg.eval_batch)
            ev = time.perf_counter() - t1
            # the same batches, in the same order, for every method's finetune
            batches = DistilBatches(data, teacher, cfg.batch_size, cfg.hflip, cfg.seed + 100)
            t1 = time.perf_counter()
            finetune(model, batches, cfg, f"{method} {budget}")
            ft = time.perf_counter() - t1
            prune_s = s.pop("seconds", None)
            record(method, budget, model, top1_pruned,
                   {**s, "_times": {"finetune": ft, "eval_pruned": ev}}, prune_s)

    specs = {"hessian_macs": ("hessian", "macs"), "hessian_latency": ("hessian", "latency"),
             "taylor_macs": ("taylor", "macs"), "magnitude_macs": ("magnitude", "macs"),
             "random_macs": ("random", "macs")}
    unit_scales = {"emb": 1.0, "head": 1.0, "qk": 1.0, "v": 1.0, "mlp": 1.0}
    scales_of = {"hessian_unit_macs": unit_scales}
    specs["hessian_unit_macs"] = ("hessian", "macs")
    run_key = {"config": asdict(cfg), "dense_top1": dense_top1, "threads": args.threads}
    for method in methods:
        t0 = time.perf_counter()
        print(f"{METHODS[method][0]} {METHODS[method][1]}", flush=True)
        done = work / f"rows_{cfg.data}_{method}.json"  # a killed run resumes per method
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("key") == run_key:
                rows += saved["rows"]
                times[f"{method}_s"] = saved["seconds"]
                print(f"  reusing {done} (measured in an earlier run)")
                continue
        n_before = len(rows)
        if method in specs:
            batches = DistilBatches(data, teacher, cfg.prune_batch, cfg.hflip, cfg.seed + 10)
            snaps = prune_ours(dense, *specs[method], batches, data, cfg, table,
                               scales_of.get(method))
            finish(method, snaps)
        elif method == "torch_pruning":
            try:
                import torch_pruning  # noqa: F401
            except ImportError:
                print("  torch-pruning is not installed; skipped "
                      "(pip install -r requirements-bench.txt)")
                continue
            batches = DistilBatches(data, teacher, cfg.prune_batch, cfg.hflip, cfg.seed + 10)
            snaps = prune_torch_pruning(dense, batches, cfg)
            finish(method, snaps)
        else:  # uniform scaling from scratch
            epochs = cfg.uniform_epochs or cfg.dense_epochs + cfg.ft_epochs
            for budget in BUDGETS:
                torch.manual_seed(cfg.seed)
                model = models.ReViT(uniform_dims(dense.dims, budget))
                t1 = time.perf_counter()
                train_scratch(model, data, cfg, epochs, cfg.seed, f"uniform {budget}")
                record(method, budget, model, None,
                       {"epochs": epochs, "_times": {"train": time.perf_counter() - t1}}, None)
        times[f"{method}_s"] = time.perf_counter() - t0
        done.write_text(json.dumps({"key": run_key, "rows": rows[n_before:],
                                    "seconds": times[f"{method}_s"]}))

    times["total_s"] = time.perf_counter() - t_start
    md = report(rows, cfg, dense, dense_top1, dense_macs, times, len(data.x_val), study)
    result = {"config": asdict(cfg), "data": data_kind, "n_train": len(data.x_train),
              "n_val": len(data.x_val),
              "dense": {"top1": dense_top1, "macs": dense_macs,
                        "params": sum(p.numel() for p in dense.parameters()),
                        "dims": dense.dims.to_dict()},
              "methods": {k: v[1] for k, v in METHODS.items()}, "budgets": list(BUDGETS),
              "rows": rows, "times_s": times}
    path = write_results(study, result, md)
    print(md)
    print(f"wrote {path}")


def report(rows: list[dict], cfg: Config, dense: models.ReViT, dense_top1: float,
           dense_macs: float, times: dict, n_val: int, study: str) -> str:
    headers = ["method", "budget", "top-1 pruned", "top-1 finetuned", "params", "MMACs",
               "MACs ratio", "latency/dense b1 (p25-p75)", "latency/dense b32 (p25-p75)",
               "dims"]
    table = [["dense", "1.00", "", f"{dense_top1:.2f}",
              f"{sum(p.numel() for p in dense.parameters()):,}", f"{dense_macs / 1e6:.1f}",
              "1.000", "1.00", "1.00", dims_text(describe(dense, dense_macs)["dims"])]]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (-r["budget"], order[r["method"]])):
        lat = r["latency"]
        table.append([f"{r['label']} {METHODS[r['method']][1]}", f"{r['budget']:.2f}",
                      "-" if r["top1_pruned"] is None else f"{r['top1_pruned']:.2f}",
                      f"{r['top1_finetuned']:.2f}", f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}",
                      f"{r['macs_ratio']:.3f}",
                      f"{lat['b1']['median']:.2f} ({lat['b1']['p25']:.2f}-{lat['b1']['p75']:.2f})",
                      f"{lat['b32']['median']:.2f} ({lat['b32']['p25']:.2f}-{lat['b32']['p75']:.2f})",
                      dims_text(r["dims"])])
    uniform_epochs = cfg.uniform_epochs or cfg.dense_epochs + cfg.ft_epochs
    design = (
        f"Model: {cfg.depth} blocks, embed {cfg.embed_dim}, {cfg.num_heads} heads, MLP "
        f"{cfg.mlp_dim}, {cfg.img_size} px, patch {cfg.patch_size}; data {cfg.data}. Dense: "
        f"{cfg.dense_epochs} epochs, AdamW lr {cfg.dense_lr}, cosine, label smoothing "
        f"{cfg.label_smoothing}, crop pad {cfg.crop_pad}, flip {cfg.hflip}. (a)-(e): one pruning "
        f"run each through 50% to 25% MACs, prune step every {cfg.interval} iterations of batch "
        f"{cfg.prune_batch}, {cfg.prune_per_iter} units per step, group sizes {cfg.group_sizes}, "
        f"KL (x{cfg.kl_coeff}) to the dense model + CE between steps at lr {cfg.prune_lr}. "
        f"(b): lambda set at the first step so the median latency penalty is "
        f"{cfg.latency_weight}x the median score (table: batch 32, this model's tokens). "
        f"(g): Torch-Pruning MetaPruner + GroupTaylorImportance, global_pruning + isomorphic, "
        f"prune_num_heads (head ratio up to {cfg.tp_head_ratio}), embedding and MLP widths "
        f"(channel ratio up to {cfg.tp_ratio} over {cfg.tp_steps} steps), round_to 2, "
        f"classifier ignored, the same KL training between steps. Every pruned model: "
        f"{cfg.ft_epochs} finetune epoch(s) of KL + CE at lr {cfg.ft_lr} (flip-only "
        f"augmentation, dense logits cached). (f): the dense recipe from scratch for "
        f"{uniform_epochs} epochs (= dense + finetune epochs; no pruning iterations, no KL). "
        f"Latency = model / dense time, median of interleaved pairs, on this CPU.")
    part_times = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items())
    return (md_table(headers, table) + "\n\n## Findings\n\n"
            + findings(rows, dense_top1, n_val)
            + "\n\n## Design\n\n" + design + "\n\n## Time per part\n\n" + part_times
            + f"\n\nPlots: {', '.join(plot(rows, dense_top1, study))}")


if __name__ == "__main__":
    main()
