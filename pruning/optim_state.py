"""Clearing optimizer state of pruned weights.

A removed unit's weights get zero gradient (its gate is 0), but Adam's running moments
would keep moving them and keep their memory of the dense model; zeroing those entries
makes a pruned unit's weights stand still, as if it were gone.
"""
from __future__ import annotations

import torch

from models.revit import ReViT


def _emb_slices(model: ReViT, cs: list[int]) -> list[tuple[torch.Tensor, tuple]]:
    out = [(model.patch_embed.proj.weight, (cs,)), (model.patch_embed.proj.bias, (cs,)),
           (model.cls_token, (slice(None), slice(None), cs)),
           (model.pos_embed, (slice(None), slice(None), cs)),
           (model.norm.weight, (cs,)), (model.norm.bias, (cs,)),
           (model.head.weight, (slice(None), cs))]
    if model.dist_token is not None:
        out += [(model.dist_token, (slice(None), slice(None), cs)),
                (model.head_dist.weight, (slice(None), cs))]
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        out += [(blk.norm1.weight, (cs,)), (blk.norm1.bias, (cs,)),
                (blk.norm2.weight, (cs,)), (blk.norm2.bias, (cs,)),
                (a.q.weight, (slice(None), cs)), (a.k.weight, (slice(None), cs)),
                (a.v.weight, (slice(None), cs)), (a.proj.weight, (cs,)), (a.proj.bias, (cs,)),
                (m.fc1.weight, (slice(None), cs)), (m.fc2.weight, (cs,)), (m.fc2.bias, (cs,))]
    return out


def pruned_slices(model: ReViT, kind: str, block: int | None, units: list
                  ) -> list[tuple[torch.Tensor, tuple]]:
    """(parameter, index) pairs of the weights that belong only to the given units."""
    if kind == "emb":
        return _emb_slices(model, list(units))
    blk = model.blocks[block]
    a, m = blk.attn, blk.mlp
    if kind == "mlp":
        return [(m.fc1.weight, (units,)), (m.fc1.bias, (units,)), (m.fc2.weight, (slice(None), units))]
    if kind == "head":
        qk_rows = [h * a.qk_dim + d for h in units for d in range(a.qk_dim)]
        v_rows = [h * a.v_dim + d for h in units for d in range(a.v_dim)]
    elif kind == "qk":
        qk_rows, v_rows = [h * a.qk_dim + d for h, d in units], []
    elif kind == "v":
        qk_rows, v_rows = [], [h * a.v_dim + d for h, d in units]
    else:
        raise KeyError(f"unknown kind {kind!r}")
    out = []
    if qk_rows:
        out += [(p, (qk_rows,)) for p in (a.q.weight, a.q.bias, a.k.weight, a.k.bias)]
    if v_rows:
        out += [(a.v.weight, (v_rows,)), (a.v.bias, (v_rows,)), (a.proj.weight, (slice(None), v_rows))]
    return out


@torch.no_grad()
def clear_pruned_state(optimizer: torch.optim.Optimizer, model: ReViT, removed: list) -> None:
    """Zero every per-parameter optimizer tensor (momenta, second moments) at pruned units."""
    for kind, block, units in removed:
        for param, index in pruned_slices(model, kind, block, units):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value[index] = 0
