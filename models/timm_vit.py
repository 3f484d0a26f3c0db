"""Converting between our ReViT and timm's VisionTransformer module (not its weights file).

Tools that work on timm modules (Torch-Pruning, which prunes them in place) leave a timm ViT
whose blocks may differ in heads and widths; `timm_vit_to_nvit` makes it one of our models
(exact, per-block widths kept), and `nvit_to_timm_vit` builds the timm module of a uniform,
non-distilled ReViT. Both share the `qkv` layout, so weights copy as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from .dims import Dims
from .revit import LN_EPS, ReViT


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _check_supported(model: nn.Module) -> None:
    """Refuse timm ViT variants whose function our ReViT cannot express."""
    problems = []
    if getattr(model, "cls_token", None) is None:
        problems.append("no class token")
    if getattr(model, "global_pool", "token") != "token":
        problems.append(f"global_pool={model.global_pool!r} (only 'token')")
    if getattr(model, "num_reg_tokens", 0):
        problems.append("register tokens")
    if getattr(model, "no_embed_class", False):
        problems.append("no_embed_class")
    if getattr(model, "pos_embed", None) is None:
        problems.append("no learned position embedding")
    for name in ("norm_pre", "fc_norm", "head_drop"):
        m = getattr(model, name, None)
        if not _is_identity(m) and not isinstance(m, nn.Dropout):
            problems.append(f"{name} is {type(m).__name__}")
    if not isinstance(model.norm, nn.LayerNorm):
        problems.append("final norm is not a LayerNorm")
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        for name in ("ls1", "ls2"):
            if not _is_identity(getattr(blk, name, None)):
                problems.append(f"block {i} has layer scale")
        for name in ("q_norm", "k_norm", "norm"):
            if not _is_identity(getattr(a, name, None)):
                problems.append(f"block {i} attention has {name}")
        if getattr(a, "gate", None) is not None:
            problems.append(f"block {i} attention is gated")
        if a.qkv.bias is None or a.proj.bias is None:
            problems.append(f"block {i} attention has no qkv/proj bias")
        if not _is_identity(getattr(blk.mlp, "norm", None)):
            problems.append(f"block {i} MLP has a norm")
        if not isinstance(blk.mlp.act, nn.GELU):
            problems.append(f"block {i} MLP activation is {type(blk.mlp.act).__name__}")
    norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        problems.append("a norm is not a LayerNorm")
    elif any(abs(n.eps - LN_EPS) > 1e-12 for n in norms):
        problems.append(f"LayerNorm eps differs from {LN_EPS}")
    if problems:
        raise ValueError("timm model not convertible to ReViT: " + "; ".join(sorted(set(problems))))


def _attn_scale(attn: nn.Module, head_dim: int) -> float:
    """The scale timm's forward really applies: SDPA's default on the fused path."""
    if getattr(attn, "fused_attn", False):
        return head_dim ** -0.5
    return float(attn.scale)


def timm_vit_dims(model: nn.Module) -> Dims:
    """Our Dims of a (possibly pruned) timm VisionTransformer, read from layer shapes."""
    _check_supported(model)
    pe = model.patch_embed
    E = pe.proj.out_channels
    heads, head_dims, mlps, scales = [], [], [], []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        H = int(a.num_heads)
        out = a.qkv.out_features
        if out % (3 * H):
            raise ValueError(f"block {i}: qkv width {out} is not 3 x {H} heads x head dim "
                             f"(was attn.num_heads updated after pruning?)")
        d = out // (3 * H)
        heads.append(H)
        head_dims.append(d)
        mlps.append(blk.mlp.fc1.out_features)
        scales.append(_attn_scale(a, d))
    img = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    return Dims(E, heads, head_dims, list(head_dims), mlps, attn_scale=scales, img_size=int(img),
                patch_size=int(patch), in_chans=pe.proj.in_channels,
                num_classes=model.head.out_features, distilled=False)


def timm_vit_to_nvit(model: nn.Module) -> tuple[Dims, dict[str, torch.Tensor]]:
    """(Dims, state dict) of our ReViT computing what the timm ViT computes.

    Heads, head width and MLP width may differ per block (as global pruning leaves them);
    the attention scale of every block is kept as the timm model applies it.
    """
    dims = timm_vit_dims(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keep = {}
    for k, v in sd.items():
        if k.startswith(("blocks.", "patch_embed.proj.", "norm.", "head.")) or k in (
                "cls_token", "pos_embed"):
            keep[k] = v
    return dims, keep


def load_nvit(dims: Dims, state: dict[str, torch.Tensor]) -> ReViT:
    """Our model from a converted (dims, state dict); strict, so nothing is silently lost."""
    model = ReViT(dims)
    model.load_state_dict(state, strict=True)
    return model


def nvit_to_timm_vit(model: ReViT) -> nn.Module:
    """A timm VisionTransformer with the weights of a uniform, non-distilled ReViT (qkv fused)."""
    from timm.models.vision_transformer import VisionTransformer
    d = model.dims
    if d.distilled:
        raise ValueError("a distilled ReViT has no timm VisionTransformer equivalent")
    if not d.is_uniform or d.qk_dim[0] != d.v_dim[0]:
        raise ValueError("timm's VisionTransformer needs uniform dims with QK width = V width")
    H, hd, M = d.num_heads[0], d.qk_dim[0], d.mlp_dim[0]
    if abs(d.attn_scale[0] - hd ** -0.5) > 1e-12:
        raise ValueError("timm's attention scale is 1/sqrt(head dim); this model uses another")
    vit = VisionTransformer(img_size=d.img_size, patch_size=d.patch_size, in_chans=d.in_chans,
                            num_classes=d.num_classes, global_pool="token", embed_dim=d.embed_dim,
                            depth=d.depth, num_heads=H, mlp_ratio=M / d.embed_dim, qkv_bias=True,
                            class_token=True)
    for blk in vit.blocks:  # head width need not be embed / heads
        if blk.attn.head_dim != hd or blk.mlp.fc1.out_features != M:
            raise ValueError("timm built other widths than the ReViT has")
    vit.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True)
    return vit.train(model.training)
