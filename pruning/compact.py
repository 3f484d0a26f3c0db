"""Turn a gated model (ReViT or ReSwin) into the dense smaller one computing the same function.

Removed units (gate 0) are dropped; live gate values are folded into the weights that
produce their unit (a no-op for the usual value 1), so the compact model equals the gated
one for any gate values; which weights those are is the unit map's (pruning/units.py).
The per-block attention scale is kept from the original dims: it is part of the function
and must not follow the smaller QK width.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import replace

import torch

from .gates import live_widths, widths_to_dims
from models.dims import rope_partner

from .units import block_names, compact_state, qk_pair

# dropout and drop-path modules (or rates) kept as they were, per block and model-wide
_BLOCK_REGULARISERS = ("attn.attn_drop", "attn.proj_drop", "mlp.drop1", "mlp.drop2",
                       "drop_path1", "drop_path2")
_MODEL_REGULARISERS = ("pos_drop", "head.drop")


def has_gates(model: torch.nn.Module) -> bool:
    g = model.current_gates()
    return (g["emb"] is not None or g["blocks"] is not None
            or any(v is not None for v in g.get("model", {}).values()))


def compacted_dims(model: torch.nn.Module):
    """Dims of `compact(model)`: live widths, the model's frame and attention scales.

    A width pruned to 0 becomes one zero-weight placeholder unit (models need >= 1).
    """
    g = model.current_gates()
    dims = widths_to_dims(live_widths(g["emb"], g["blocks"], model.dims, g.get("model")),
                          model.dims)
    return replace(dims, rope_dims=kept_rope_dims(model, g["blocks"])) if qk_pair(dims) else dims


def kept_rope_dims(model: torch.nn.Module, blocks: list | None) -> list[list[int]]:
    """Per block, the rotary table dims its live QK pairs rotate by (a QK width pruned to
    nothing keeps one zero placeholder pair, the table's first)."""
    d = model.dims
    out = []
    for i in range(d.depth):
        table = d.rope_index(i) or list(range(d.rope_dim))
        g = None if blocks is None else blocks[i]
        qk = None if g is None or g.get("qk") is None else g["qk"].detach().cpu()
        if qk is None:
            out.append(table)
            continue
        head = g.get("head")
        live = torch.ones(qk.shape[0], dtype=torch.bool) if head is None else head.detach().cpu() != 0
        dims = [] if not bool(live.any()) else torch.nonzero(qk[live][0] != 0).flatten().tolist()
        if not dims:
            dims = sorted({0, rope_partner(0, len(table), d.rope_half)})
        out.append([table[j] for j in dims])
    return out


def _copy_attr(new: torch.nn.Module, old: torch.nn.Module, path: str) -> None:
    *owner, attr = path.split(".")
    try:
        src = functools.reduce(getattr, owner, old)
        dst = functools.reduce(getattr, owner, new)
        value = getattr(src, attr)
    except AttributeError:
        return
    setattr(dst, attr, copy.deepcopy(value))


def feature_channels(model: torch.nn.Module) -> list[int] | None:
    """Which of the model's output channels (the last stream's) its compact version keeps,
    in order; None when every one is kept. A label-free finetuning of the compact model
    compares these with the full model's features (losses.FeatureDistillLoss)."""
    embs = model.current_gates()["emb"]
    gate = None if embs is None else embs[-1]
    if gate is None or bool((gate != 0).all()):
        return None
    return torch.nonzero(gate.detach() != 0).flatten().tolist()


@torch.no_grad()
def compact(model: torch.nn.Module) -> torch.nn.Module:
    """A new dense model of the same class, without gates, computing what the gated
    `model` computes."""
    if not has_gates(model):
        return copy.deepcopy(model)
    dims = compacted_dims(model)
    new_sd = compact_state(model, model.current_gates(), dims)
    out = type(model)(dims)
    for path in _MODEL_REGULARISERS:
        _copy_attr(out, model, path)
    for new_name, old_name in zip(block_names(out), block_names(model)):
        for path in _BLOCK_REGULARISERS:
            _copy_attr(out.get_submodule(new_name), model.get_submodule(old_name), path)
    out.pretrained_cfg = copy.deepcopy(model.pretrained_cfg)
    ref = next(model.parameters())
    out.to(device=ref.device, dtype=ref.dtype)
    out.load_state_dict(new_sd)
    out.train(model.training)
    return out
