"""Study 5 (benchmarks/bench_quality.py): the methods, budgets and the recipe that decides the
numbers (`Config`, stored with the results)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


import models


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
# ... except these: trained from scratch, a run shares only its seed number with (a)'s (not
# the dense model, nor the batch order), so it is compared by an unpaired (Welch) interval
UNPAIRED = ("uniform_scratch",)
# The reference's commands pass --kl_loss_coeff 100000 on ImageNet's 1000 classes; the KL is an
# element-wise mean over batch x classes, so the same weight relative to the label loss here is
# 100000 x classes / 1000 (100x the batch-mean KL whatever the class count).
REFERENCE_KL_COEFF, REFERENCE_CLASSES = 1e5, 1000


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
    # "vit", or "swin": `stages` stages of `depth` blocks each, the width, heads and MLP
    # doubling per stage from embed_dim, num_heads and mlp_dim, windows of `window`
    family: str = "vit"
    stages: int = 1
    window: int = 4

    def kl_coeff(self, num_classes: int) -> float:
        if self.kl_loss_coeff is not None:
            return self.kl_loss_coeff
        return REFERENCE_KL_COEFF * num_classes / REFERENCE_CLASSES

    def scratch_epochs(self) -> int:
        """(g)'s epochs: the dense model's plus the finetune's (the pruning phase, 0.4-1.3
        epochs of its batches on CIFAR-10, is not counted)."""
        return int(math.ceil(self.uniform_epochs or self.dense_epochs + self.ft_epochs))

    def dims(self, num_classes: int = 10) -> models.Dims | models.SwinDims:
        frame = dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=3,
                     num_classes=num_classes)
        if self.family == "swin":
            n, width = self.stages, [self.embed_dim * 2 ** s for s in range(self.stages)]
            return models.SwinDims(
                width, [self.depth] * n,
                [self.num_heads * 2 ** s for s in range(n) for _ in range(self.depth)],
                self.embed_dim // self.num_heads, self.embed_dim // self.num_heads,
                [self.mlp_dim * 2 ** s for s in range(n) for _ in range(self.depth)],
                [self.window] * n, **frame)
        return models.Dims.uniform(self.embed_dim, self.depth, self.num_heads, self.mlp_dim,
                                   distilled=False, **frame)

    def dense_key(self) -> dict:
        """The fields the cached dense model depends on."""
        keys = ("data", "embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "img_size",
                "train_subset", "batch_size", "dense_epochs", "dense_lr", "weight_decay",
                "warmup_frac", "label_smoothing", "crop_pad", "hflip", "seed")
        extra = ("family", "stages", "window") if self.family != "vit" else ()
        return {k: getattr(self, k) for k in keys + extra}


FULL = dict(embed_dim=128, depth=4, num_heads=4, mlp_dim=256, patch_size=4, dense_epochs=150)
QUICK = dict(embed_dim=48, depth=2, num_heads=3, mlp_dim=96, patch_size=8, batch_size=64,
             dense_epochs=150, dense_lr=3e-3, crop_pad=2, hflip=False, prune_batch=32,
             interval=3, prune_per_iter=24, tp_steps=16, ft_epochs=3, ft_lr=1e-3,
             latency_repeats=6, group_sizes={"emb": 4, "head": 1, "qk": 4, "v": 4, "mlp": 8})
# the Swin arm (--family swin): a two-stage Swin (32 then 64 channels, 2 and 4 heads of 16,
# MLP 4x, windows of 4: stage 0's 8x8 tokens in shifted windows, stage 1's 4x4 in one) on
# DIGITS; the methods that apply to it
SWIN = dict(family="swin", stages=2, window=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=128,
            patch_size=4, dense_epochs=150, crop_pad=2, hflip=False,
            tp_ratio=0.95)  # (h) prunes a Swin's MLPs only: to reach 50% it needs most of them
SWIN_QUICK = dict(SWIN, depth=1, batch_size=64,
                  dense_epochs=3, prune_batch=32, interval=3, prune_per_iter=24, tp_steps=16,
                  ft_epochs=1, latency_repeats=3)
SWIN_METHODS = ("hessian_macs", "magnitude_macs", "uniform_scratch", "torch_pruning")
SWIN_NAMES = {"torch_pruning": "Torch-Pruning (group Taylor, MLP units only)"}  # its Swin scope


def method_name(method: str, family: str = "vit") -> str:
    """What a method is called in a report: on a Swin, (h) has another scope."""
    return (SWIN_NAMES if family == "swin" else {}).get(method, METHODS[method][1])
