"""Measuring a Swin's latency table: per stage, its attention sublayer (plain and, where the
stage shifts, shifted) and its MLP sublayer over a grid of widths, at the stage's own token
grid and window; and the stem's parts (patch embedding, each patch merging, the head). The
modules are ReSwin's own; times are `latency.Timer`'s medians."""
from __future__ import annotations

import time

import torch
from torch import nn

from models.swin import PatchMerging, SwinBlock, SwinPatchEmbed
from models.swin_dims import LN_EPS, SwinDims
from models.revit import StreamNorm
from timm.layers import ClassifierHead

from .cost_swin import SwinLatencyTable, stage_frames
from .latency import Timer, table_meta

GRID_KEYS = ("embed_dims", "heads", "qk_dims", "v_dims", "mlp_dims")


class SwinAttentionSublayer(nn.Module):
    """A block's attention branch with its norm and residual add, as the block runs it (v1
    normalises the branch's input, v2 its output)."""

    def __init__(self, block: SwinBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        if b.version == 1:
            return x + b._attn(b.norm1(x), None)
        return x + b.norm1(b._attn(x, None))


class SwinMlpSublayer(nn.Module):
    def __init__(self, block: SwinBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        if b.version == 1:
            return x + b.mlp(b.norm2(x))
        return x + b.norm2(b.mlp(x))


class SwinHead(nn.Module):
    """The final norm, pooling and classifier."""

    def __init__(self, embed_dim: int, num_classes: int, global_pool: str) -> None:
        super().__init__()
        self.norm = StreamNorm(embed_dim, eps=LN_EPS)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, input_fmt="NHWC")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def _block(d: SwinDims, s: int, E: int, h: int, q: int, v: int, m: int, shift: int) -> SwinBlock:
    window, _ = d.window(s)
    return SwinBlock(E, d.grid(s), window, shift, d.version, h, q, v, m, q ** -0.5,
                     d.qkv_bias, d.pretrained_window_size[s])


def measure_swin_table(grids: list[dict[str, list[int]]], dims: SwinDims,
                       device: torch.device, batch_size: int, warmup: int = 5,
                       repeats: int = 20, amp_dtype: torch.dtype | None = None,
                       model: str | None = None, runtime: str = "torch") -> dict:
    """A SwinLatencyTable's JSON: `grids[s]` holds stage s's widths (embed_dims, heads,
    qk_dims, v_dims, mlp_dims); `dims` gives the stages' grids, windows and the frame."""
    timer = Timer(device, warmup, repeats, amp_dtype, runtime)
    B, d = batch_size, dims
    stages = []
    for s, g in enumerate(grids):
        t0 = time.perf_counter()
        Es, Hs, Qs, Vs, Ms = (g[k] for k in GRID_KEYS)
        side = d.grid(s)
        _, shift = d.window(s)
        parts = {"attention": [], "mlp": []}
        if shift:
            parts["attention_shifted"] = []
        for E in Es:
            x = torch.randn(B, side, side, E, device=device)
            for part, sh in (("attention", 0), ("attention_shifted", shift)):
                if part in parts:
                    parts[part].append([[[timer(SwinAttentionSublayer(_block(d, s, E, h, q, v, 1, sh)), x)
                                          for v in Vs] for q in Qs] for h in Hs])
            parts["mlp"].append([timer(SwinMlpSublayer(_block(d, s, E, 1, 1, 1, m, 0)),
                                       x.reshape(B, side * side, E)) for m in Ms])
        axes = {"embed_dim": Es, "num_heads": Hs, "qk_dim": Qs, "v_dim": Vs}
        stages.append({p: ((axes if p != "mlp" else {"embed_dim": Es, "mlp_dim": Ms}), values)
                       for p, values in parts.items()})
        print(f"  stage {s} ({side}x{side} tokens): {len(Es) * len(Hs) * len(Qs) * len(Vs)} "
              f"attention{' (x2: shifted)' if shift else ''} + {len(Es) * len(Ms)} MLP points "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    img = torch.randn(B, d.in_chans, d.img_size, d.img_size, device=device)
    first, last = grids[0]["embed_dims"], grids[-1]["embed_dims"]
    stem = {"patch_embed": ({"embed_dim": first}, [
                timer(SwinPatchEmbed(d.img_size, d.patch_size, d.in_chans, E), img) for E in first]),
            "head": ({"embed_dim": last}, [
                timer(SwinHead(E, d.num_classes, d.global_pool),
                      torch.randn(B, d.grid(d.num_stages - 1), d.grid(d.num_stages - 1), E,
                                  device=device)) for E in last]),
            "merges": []}
    for s in range(1, len(grids)):
        ins, outs, side = grids[s - 1]["embed_dims"], grids[s]["embed_dims"], d.grid(s - 1)
        stem["merges"].append(({"in_dim": ins, "embed_dim": outs}, [
            [timer(PatchMerging(i, o, d.version, side),
                   torch.randn(B, side, side, i, device=device)) for o in outs] for i in ins]))
    meta = {**table_meta(timer, device, B, amp_dtype, runtime, warmup, repeats),
            "model": model, "version": d.version, "stages": stage_frames(d),
            "timed": {"attention": "LayerNorm + window attention (roll and shift mask in "
                                   "attention_shifted; v2: cosine attention, position-bias "
                                   "MLP, norm after) + residual add",
                      "mlp": "LayerNorm + Mlp (fc1, GELU, fc2) + residual add",
                      "patch_embed": "convolution + LayerNorm", "merges": "patch merging",
                      "head": "final LayerNorm, pooling, classifier"}}
    return SwinLatencyTable.make_dict(meta, stages, stem)

