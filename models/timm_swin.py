"""Reading timm's Swin Transformer (v1) and Swin Transformer V2 modules as SwinDims.

`timm_swin_dims` is the one place that knows how a timm Swin's structure maps onto our
dims (per stage: width, depth, window; per block: heads, head width, MLP width, v1's q
scale, v2's pretrained window) and which timm Swin features we do not cover; it refuses
those in one line that names them. Parameter names are shared, so weights copy as they are.
"""
from __future__ import annotations

from torch import nn

from errors import UserError

from .swin_dims import LN_EPS, SwinDims

TIMM_CLASSES = {"SwinTransformer": 1, "SwinTransformerV2": 2}
# one example name per version; tests/test_swin.py builds every registered name
FAMILIES = {"Swin": "swin_tiny_patch4_window7_224", "Swin v2": "swinv2_tiny_window8_256"}


def is_timm_swin_name(name: str) -> bool:
    return name.startswith("swin")


def _square(v, what: str) -> int:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if v[0] != v[1]:
        raise UserError(f"{what} {v[0]}x{v[1]} is not square; only square ones are supported",
                        field="name")
    return int(v[0])


def unsupported_features(model: nn.Module) -> list[str]:
    """The features of a timm Swin that our ReSwin cannot express, named as users know them."""
    cls = type(model).__name__
    if cls not in TIMM_CLASSES:
        if cls == "SwinTransformerV2Cr":
            return ["the swinv2_cr variant (its own block layout, scaled cosine attention and "
                    "post-norm placement; timm's swin_* and swinv2_* are supported)"]
        return [f"model class {cls}"]
    found = []
    if getattr(model, "dynamic_img_size", False):
        found.append("dynamic_img_size (strict_img_size=False)")
    norms = [model.patch_embed.norm, model.norm]
    for stage in model.layers:
        if not isinstance(stage.downsample, nn.Identity):
            norms.append(stage.downsample.norm)
        for blk in stage.blocks:
            norms += [blk.norm1, blk.norm2]
            if getattr(blk, "always_partition", False):
                found.append("always_partition")
            if getattr(blk, "dynamic_mask", False):
                found.append("dynamic_mask")
            if getattr(blk.attn, "qkv_bias_separate", False):
                found.append("qkv_bias_separate")
            if getattr(blk.attn, "fused_attn", False):
                found.append("fused attention (TIMM_FUSED_ATTN): ours computes timm's default "
                             "path")
            mlp = blk.mlp
            if type(mlp).__name__ != "Mlp" or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                found.append(f"MLP class {type(mlp).__name__}")
            elif type(mlp.act).__name__ != "GELU" or getattr(mlp.act, "approximate", "none") != "none":
                found.append(f"MLP activation {type(mlp.act).__name__} (only exact GELU)")
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        found.append("a norm that is not a LayerNorm")
    elif any(abs(n.eps - LN_EPS) > 1e-12 for n in norms):
        found.append(f"LayerNorm eps other than {LN_EPS}")
    pool = getattr(model, "global_pool", "avg")
    if pool not in ("avg", ""):
        found.append(f"global_pool={pool!r}")
    return list(dict.fromkeys(found))


def timm_swin_dims(model: nn.Module, name: str | None = None) -> SwinDims:
    """Our SwinDims of a timm SwinTransformer / SwinTransformerV2, read from its layers."""
    what = name or f"this timm {type(model).__name__}"
    found = unsupported_features(model)
    if found:
        raise UserError(f"{what} is not supported: {'; '.join(found)}", field="name")
    version = TIMM_CLASSES[type(model).__name__]
    pe = model.patch_embed
    ref_windows = getattr(model, "_ref_window_sizes", None)
    embed, depths, windows, pretrained = [], [], [], []
    heads, qk, mlp, scales = [], [], [], []
    for s, stage in enumerate(model.layers):
        blk0 = stage.blocks[0]
        embed.append(int(blk0.norm1.normalized_shape[0]))
        depths.append(len(stage.blocks))
        window = ref_windows[s] if ref_windows is not None else blk0.window_size
        windows.append(_square(window, f"{what}: the window of stage {s}"))
        if version == 2:
            pretrained.append(_square(blk0.attn.pretrained_window_size,
                                      f"{what}: the pretrained window of stage {s}"))
        for blk in stage.blocks:
            a = blk.attn
            H = int(a.num_heads)
            out = a.qkv.out_features
            if out % (3 * H):
                raise UserError(f"{what}: qkv width {out} is not 3 x {H} heads x head dim",
                                field="name")
            heads.append(H)
            qk.append(out // (3 * H))
            mlp.append(blk.mlp.fc1.out_features)
            scales.append(float(a.scale) if version == 1 else 1.0 / (out // (3 * H)) ** 0.5)
    attn = model.layers[0].blocks[0].attn
    qkv_bias = (attn.qkv.bias is not None) if version == 1 else (attn.q_bias is not None)
    return SwinDims(embed, depths, heads, qk, list(qk), mlp, windows, version=version,
                    attn_scale=scales, pretrained_window_size=pretrained or None,
                    qkv_bias=qkv_bias, img_size=_square(pe.img_size, f"{what}: the image size"),
                    patch_size=_square(pe.patch_size, f"{what}: the patch size"),
                    in_chans=pe.proj.in_channels, num_classes=model.num_classes,
                    global_pool=model.global_pool)
