"""Building a ReSwin: from a timm Swin name, a SwinDims spec, timm's or Microsoft's weights,
or one of our checkpoints (models.build_model comes here for a Swin).

A foreign state dict says per stage the embedding width, the depth, the heads (v1: the
relative position bias table's columns; v2: the logit scales) and v1's window (the table's
side), per block the head and MLP widths, and the classes; the image size, v2's windows and
its pretrained windows come from the name (and timm's kwargs). Microsoft's original
checkpoints (patch merging at the end of a stage, `head.` for the classifier, buffers
saved) are read as timm reads them.
"""
from __future__ import annotations

import math
import re

from timm.layers import resize_rel_pos_bias_table

from errors import UserError

from .swin import ReSwin
from .swin_dims import FRAME_FIELDS, SwinDims

_STAGE_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def is_swin_state(sd: dict) -> bool:
    """A timm or Microsoft Swin state dict (stages of blocks with window attention)."""
    return any(_STAGE_BLOCK.match(k) for k in sd) and any(
        "relative_position_bias_table" in k or "cpb_mlp" in k for k in sd)


def timm_layout(sd: dict) -> dict:
    """Microsoft's original layout (merging at the end of a stage, `head.`, buffers saved)
    as timm's, as timm's checkpoint filter does; timm's own layout unchanged."""
    old = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for k, v in sd.items():
        if any(b in k for b in _BUFFERS):
            continue
        if old:
            k = re.sub(r"layers\.(\d+)\.downsample",
                       lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = k.replace("head.", "head.fc.") if k.startswith("head.") else k
        out[k] = v
    return out


def state_dims(sd: dict, base: SwinDims | None, source: str) -> SwinDims:
    """SwinDims of a timm-layout Swin state dict; what the tensors cannot tell is `base`'s."""
    if base is None:
        raise UserError(f"{source} holds a Swin; name its timm model (a swin_* or swinv2_* "
                        f"name) so its image size and windows are known", field="name")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = _STAGE_BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if stages != list(range(len(stages))) or len(stages) != base.num_stages:
        raise UserError(f"{source} holds {len(stages)} stages, the model name "
                        f"{base.num_stages}", field="name")
    version = 2 if any("cpb_mlp" in k for k in sd) else 1
    if version != base.version:
        raise UserError(f"{source} is a Swin v{version}, the model name a v{base.version}",
                        field="name")
    embed, depths, windows, heads, qk, mlp = [], [], [], [], [], []
    for s in stages:
        depths.append(len(blocks[s]))
        embed.append(sd[f"layers.{s}.blocks.0.norm1.weight"].shape[0])
        for j in range(depths[-1]):
            p = f"layers.{s}.blocks.{j}."
            H = (sd[p + "attn.relative_position_bias_table"].shape[1] if version == 1
                 else sd[p + "attn.logit_scale"].shape[0])
            heads.append(H)
            qk.append(sd[p + "attn.qkv.weight"].shape[0] // (3 * H))
            mlp.append(sd[p + "mlp.fc1.weight"].shape[0])
        if version == 1:
            side = math.isqrt(sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[0])
            effective = (side + 1) // 2
            # a table of the stage's whole grid: the name's window, clamped as timm does
            windows.append(base.window_size[s] if effective == base.window(s)[0] else effective)
        else:
            windows.append(base.window_size[s])
    w = sd["patch_embed.proj.weight"]
    num_classes = sd["head.fc.weight"].shape[0] if "head.fc.weight" in sd else 0
    first = "layers.0.blocks.0.attn."
    qkv_bias = (first + "qkv.bias") in sd if version == 1 else (first + "q_bias") in sd
    return SwinDims(embed, depths, heads, qk, list(qk), mlp, windows, version=version,
                    attn_scale=[d ** -0.5 for d in qk],
                    pretrained_window_size=base.pretrained_window_size, qkv_bias=qkv_bias,
                    img_size=base.img_size, patch_size=w.shape[-1], in_chans=w.shape[1],
                    num_classes=num_classes, global_pool=base.global_pool)


def adapt_state(sd: dict, model: ReSwin) -> dict:
    """For finetuning at another size or label set: v1's bias tables resampled to the
    windows the new grid gives (as timm does), mismatched classifier weights fresh."""
    sd = dict(sd)
    own = model.state_dict()
    for key, value in list(sd.items()):
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            w = model.get_submodule(key.rsplit(".", 1)[0]).window
            sd[key] = resize_rel_pos_bias_table(value, new_window_size=(w, w),
                                                new_bias_shape=tuple(own[key].shape))
    for key in ("head.fc.weight", "head.fc.bias"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            sd[key] = own[key]
    return sd


def check_frame(frame: dict) -> dict:
    """The frame keyword arguments a Swin takes (a Swin has no distillation token)."""
    if frame.get("distilled"):
        raise UserError("a Swin has no distillation token (distilled): take a model without "
                        "one, or no distillation through it", field="distilled")
    return {k: v for k, v in frame.items() if k in FRAME_FIELDS}
