"""The NViT reference repository's checkpoint layouts, converted into our model exactly.

Two layouts exist (facts read from NVlabs/NViT, `nvit/models.py` and `nvit/finetune_dense.py`):

- released / finetuned models (`ft_checkpoint.pth`, NViT-B/H/S/T): `{"model", "dim": {"EMB",
  "head", "QK", "V", "MLP"}, "args", ...}` with QK and V per head, keys
  `blocks.i.attn.qkv.{Q,K,V}.{weight,bias}` (rows head-major), `blocks.i.attn.qkv.token_mask`
  (tokens, 1) multiplying q, k and v, `blocks.i.attn.proj.proj.{weight,bias}`, and a patch
  embedding that reorders each patch to (p1 p2 c) channels before a 1x1 convolution;
  attention scale 64^-0.5 in every block; cls and dist tokens with two heads.
- masked pruning checkpoints (`pruned_checkpoint.pth` of `main_full_global_latency.py`): the
  full-width model with pruned units zeroed, Q/K/V weights stored as (dim, embed, head), a
  learnable per-head `qkv.head_mask`, and the output projection as (embed, v, head). As
  `finetune_dense.py` did, the widths are read from which weights are non-zero, the head mask
  is folded into Q, K and V, and the zero units are dropped.
"""
from __future__ import annotations

import math

import torch

from errors import UserError

from .dims import REFERENCE_ATTN_SCALE, Dims

RELEASED_KEY = "blocks.0.attn.qkv.Q.weight"
DIM_KEYS = ("EMB", "head", "QK", "V", "MLP")
IN_CHANS = 3  # the reference's patch embedding is built for RGB only


def is_reference_layout(state: dict[str, torch.Tensor]) -> bool:
    return RELEASED_KEY in state


def from_reference(ckpt: dict, state: dict[str, torch.Tensor], source: str
                   ) -> tuple[Dims, dict[str, torch.Tensor]]:
    """(dims, our state dict) of a released or masked NViT reference checkpoint."""
    try:
        if state[RELEASED_KEY].dim() == 3:
            return _from_masked(state, source)
        return _from_released(ckpt, state, source)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise UserError(f"{source} looks like an NViT reference checkpoint but cannot be read "
                        f"({what})") from None


def _depth(state: dict) -> int:
    depth = 0
    while f"blocks.{depth}.norm1.weight" in state:
        depth += 1
    if depth == 0:
        raise ValueError("no blocks")
    return depth


def _frame(state: dict, source: str) -> dict:
    """Patch size, image size and classes from the stored shapes (patch channels are p*p*3)."""
    k = state["patch_embed.proj.weight"].shape[1]
    p = math.isqrt(k // IN_CHANS)
    grid = math.isqrt(state["pos_embed"].shape[1] - 2)
    if p * p * IN_CHANS != k or grid * grid != state["pos_embed"].shape[1] - 2:
        raise UserError(f"{source}: patch embedding of {k} channels or position embedding of "
                        f"{state['pos_embed'].shape[1]} tokens does not fit an RGB square grid")
    return dict(img_size=grid * p, patch_size=p, in_chans=IN_CHANS,
                num_classes=state["head.weight"].shape[0], distilled=True)


def _patch_weight(w: torch.Tensor, patch: int) -> torch.Tensor:
    """(E, p1*p2*c, 1, 1) in (p1 p2 c) order -> a p x p convolution's (E, c, p1, p2)."""
    return w.reshape(w.shape[0], patch, patch, IN_CHANS).permute(0, 3, 1, 2).contiguous()


def _common(state: dict, frame: dict, emb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stem, norms, MLPs and heads, keeping the embedding channels `emb` (a long index)."""
    out = {"patch_embed.proj.weight": _patch_weight(state["patch_embed.proj.weight"],
                                                    frame["patch_size"])[emb],
           "patch_embed.proj.bias": state["patch_embed.proj.bias"][emb]}
    for key in ("cls_token", "dist_token", "pos_embed"):
        out[key] = state[key][..., emb]
    for key in ("norm.weight", "norm.bias"):
        out[key] = state[key][emb]
    for name in ("head", "head_dist"):
        out[f"{name}.weight"] = state[f"{name}.weight"][:, emb]
        out[f"{name}.bias"] = state[f"{name}.bias"]
    return out


def _from_released(ckpt: dict, state: dict, source: str) -> tuple[Dims, dict]:
    dim = ckpt.get("dim")
    if not isinstance(dim, dict) or set(DIM_KEYS) - set(dim):
        raise UserError(f"{source}: an NViT reference model needs its 'dim' entry with "
                        f"{list(DIM_KEYS)} to be rebuilt; it has none")
    depth = _depth(state)
    emb = int(dim["EMB"])
    frame = _frame(state, source)
    token_scale = "blocks.0.attn.qkv.token_mask" in state
    dims = Dims(emb, list(dim["head"]), list(dim["QK"]), list(dim["V"]), list(dim["MLP"]),
                attn_scale=[REFERENCE_ATTN_SCALE] * depth, token_scale=token_scale,
                init="torch_default", **frame)
    if dims.depth != depth:
        raise UserError(f"{source}: 'dim' describes {dims.depth} blocks but the weights hold {depth}")
    out = _common(state, frame, torch.arange(emb))
    for i in range(depth):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            for t in ("weight", "bias"):
                out[f"{p}{n}.{t}"] = state[f"{p}{n}.{t}"]
        for ours, theirs in (("q", "Q"), ("k", "K"), ("v", "V")):
            for t in ("weight", "bias"):
                out[f"{p}attn.{ours}.{t}"] = state[f"{p}attn.qkv.{theirs}.{t}"]
        for t in ("weight", "bias"):
            out[f"{p}attn.proj.{t}"] = state[f"{p}attn.proj.proj.{t}"]
            for fc in ("fc1", "fc2"):
                out[f"{p}mlp.{fc}.{t}"] = state[f"{p}mlp.{fc}.{t}"]
        if token_scale:
            out[f"{p}attn.token_scale"] = state[f"{p}attn.qkv.token_mask"]
    return dims, out


def _live(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices along `dim` where `t` has any non-zero entry (finetune_dense.py's rule)."""
    other = [d for d in range(t.dim()) if d != dim]
    return torch.nonzero(t.abs().sum(dim=other) != 0).flatten()


def _from_masked(state: dict, source: str) -> tuple[Dims, dict]:
    depth = _depth(state)
    emb = _live(state["patch_embed.proj.weight"], 0)
    if emb.numel() == 0:
        raise UserError(f"{source}: every embedding channel is zero")
    frame = _frame(state, source)
    out = _common(state, frame, emb)
    heads, qks, vs, mlps = [], [], [], []
    for i in range(depth):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            for t in ("weight", "bias"):
                out[f"{p}{n}.{t}"] = state[f"{p}{n}.{t}"][emb]
        qw = state[f"{p}attn.qkv.Q.weight"]  # (qk, E, H)
        live_h, live_q = _live(qw, 2), _live(qw, 0)
        live_v = _live(state[f"{p}attn.qkv.V.weight"], 0)
        if min(live_h.numel(), live_q.numel(), live_v.numel()) == 0:
            raise UserError(f"{source}: block {i} has no live head, QK or V dim")
        mask = state[f"{p}attn.qkv.head_mask.weight"].reshape(-1)[live_h]  # folded into q, k, v
        for ours, theirs, live in (("q", "Q", live_q), ("k", "K", live_q), ("v", "V", live_v)):
            w = state[f"{p}attn.qkv.{theirs}.weight"][live][:, emb][:, :, live_h] * mask
            b = state[f"{p}attn.qkv.{theirs}.bias"][live][:, live_h] * mask
            out[f"{p}attn.{ours}.weight"] = w.permute(2, 0, 1).reshape(-1, emb.numel())  # (h q) e
            out[f"{p}attn.{ours}.bias"] = b.t().reshape(-1)
        pw = state[f"{p}attn.proj.weight"][emb][:, live_v][:, :, live_h]  # (e, v, h)
        out[f"{p}attn.proj.weight"] = pw.permute(0, 2, 1).reshape(emb.numel(), -1)  # e (h v)
        out[f"{p}attn.proj.bias"] = state[f"{p}attn.proj.bias"][emb]
        out[f"{p}attn.token_scale"] = state[f"{p}attn.qkv.token_mask"]
        live_m = _live(state[f"{p}mlp.fc1.weight"], 0)
        out[f"{p}mlp.fc1.weight"] = state[f"{p}mlp.fc1.weight"][live_m][:, emb]
        out[f"{p}mlp.fc1.bias"] = state[f"{p}mlp.fc1.bias"][live_m]
        out[f"{p}mlp.fc2.weight"] = state[f"{p}mlp.fc2.weight"][emb][:, live_m]
        out[f"{p}mlp.fc2.bias"] = state[f"{p}mlp.fc2.bias"][emb]
        heads.append(live_h.numel())
        qks.append(live_q.numel())
        vs.append(live_v.numel())
        mlps.append(live_m.numel())
    dims = Dims(int(emb.numel()), heads, qks, vs, mlps, attn_scale=[REFERENCE_ATTN_SCALE] * depth,
                token_scale=True, init="torch_default", **frame)
    return dims, out
