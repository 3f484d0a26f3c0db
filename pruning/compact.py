"""Turn a gated ReViT into the dense smaller ReViT that computes the same function.

Removed units (gate 0) are dropped; live gate values are folded into the weights that
produce their unit (a no-op for the usual value 1), so the compact model equals the gated
one for any gate values; which weights those are is the unit map's (pruning/units.py).
The per-block attention scale is kept from the original dims: it is part of the function
and must not follow the smaller QK width.
"""
from __future__ import annotations

import copy

import torch

from models.dims import Dims
from models.revit import ReViT

from .gates import live_widths, widths_to_dims
from .units import compact_state


def _model_gates(model: ReViT) -> tuple[torch.Tensor | None, list[dict] | None]:
    emb = model.emb_gate
    blocks = [{"head": b.attn.head_gate, "qk": b.attn.qk_gate, "v": b.attn.v_gate,
               "mlp": b.mlp.gate} for b in model.blocks]
    if all(v is None for g in blocks for v in g.values()):
        blocks = None
    return emb, blocks


def has_gates(model: ReViT) -> bool:
    emb, blocks = _model_gates(model)
    return emb is not None or blocks is not None


def compacted_dims(model: ReViT) -> Dims:
    """Dims of `compact(model)`: live widths, the model's frame and attention scales.

    A width pruned to 0 becomes one zero-weight placeholder unit (ReViT needs >= 1).
    """
    emb, blocks = _model_gates(model)
    return widths_to_dims(live_widths(emb, blocks, model.dims), model.dims)


@torch.no_grad()
def compact(model: ReViT) -> ReViT:
    """A new dense ReViT without gates computing what the gated `model` computes."""
    if not has_gates(model):
        return copy.deepcopy(model)
    dims = compacted_dims(model)
    emb_gate, block_gates = _model_gates(model)
    new_sd = compact_state(model, {"emb": emb_gate, "blocks": block_gates}, dims)
    out = ReViT(dims, drop_rate=model.pos_drop.p,
                attn_drop_rate=model.blocks[0].attn.attn_drop if len(model.blocks) else 0.0)
    # per-block dropout and drop-path settings are kept exactly as they were
    for new_blk, old_blk in zip(out.blocks, model.blocks):
        new_blk.attn.attn_drop = old_blk.attn.attn_drop
        new_blk.attn.proj_drop = copy.deepcopy(old_blk.attn.proj_drop)
        new_blk.mlp.drop1 = copy.deepcopy(old_blk.mlp.drop1)
        new_blk.mlp.drop2 = copy.deepcopy(old_blk.mlp.drop2)
        new_blk.drop_path1 = copy.deepcopy(old_blk.drop_path1)
        new_blk.drop_path2 = copy.deepcopy(old_blk.drop_path2)
    out.pretrained_cfg = copy.deepcopy(model.pretrained_cfg)
    out.to(device=model.pos_embed.device, dtype=model.pos_embed.dtype)
    out.load_state_dict(new_sd)
    out.train(model.training)
    return out
