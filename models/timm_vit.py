"""Reading timm's VisionTransformer (and Eva) modules as our Dims, and converting between them.

`timm_vit_dims` is the one place that knows how a timm ViT's structure maps onto our dims
(widths per block and the family fields: class and distillation tokens, registers,
LayerScale, qkv bias, position embedding, pooling, fc_norm, the encoders' MLPs and norms,
Eva's names and rotary embedding) and which timm features we do
not cover; it refuses those in one line that names them. `models.build_model` reads a timm
model name through it, and tools that work on timm modules (Torch-Pruning, which prunes them
in place and may leave per-block heads and widths) convert their result with
`timm_vit_to_nvit`. `nvit_to_timm_vit` goes the other way for uniform models. Parameter names
and the `qkv` layout are shared, so weights copy as they are.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from errors import UserError

from .dims import Dims
from .revit import ReViT

TIMM_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
# The supported timm ViT families, one example name each; tests/test_timm_families.py builds
# a tiny model of each through timm's constructor and compares our logits with timm's.
FAMILIES = {
    "DeiT, distilled": "deit_small_distilled_patch16_224",
    "DeiT": "deit_small_patch16_224",
    "ViT / AugReg": "vit_small_patch16_224",
    "DeiT III": "deit3_small_patch16_224",
    "DINOv2": "vit_small_patch14_dinov2",
    "DINOv2 with registers": "vit_small_patch14_reg4_dinov2",
    "ViT, registers, avg pool + fc_norm": "vit_base_patch16_reg4_gap_256",
    "ViT, avg pool": "vit_base_patch16_gap_224",
    "ViT, no qkv bias": "vit_base_patch16_224_miil",
    "ViT, no qkv bias, LayerScale, avg pool": "vit_medium_patch16_gap_256",
    "CLIP (pre-norm)": "vit_base_patch16_clip_224",
    "CLIP, QuickGELU": "vit_base_patch16_clip_quickgelu_224",
    "ViT, qk-norm": "vit_base_patch16_224",
    "DINOv2-g (packed SwiGLU)": "vit_giant_patch14_dinov2",
    "SigLIP (attention pooling)": "vit_base_patch16_siglip_224",
    "SigLIP So400m": "vit_so400m_patch14_siglip_224",
    "EVA-02 (rotary, packed SwiGLU)": "eva02_tiny_patch14_224",
    "EVA-02 B/L (SwiGLU with inner norm, separate q/k/v)": "eva02_base_patch14_224",
    "EVA-02 CLIP": "eva02_base_patch16_clip_224",
    "RoPE ViT": "vit_small_patch16_rope_224",
    "RoPE ViT, registers, avg pool": "vit_base_patch16_rope_reg1_gap_256",
}
# families that are a name built with timm kwargs (--model-kwargs): no timm name has them
FAMILY_KWARGS = {"ViT, qk-norm": {"qk_norm": True}}
POOLS = {"token": "token", "avg": "avg", "map": "map"}


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.Dropout))


def _size(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def unsupported_features(model: nn.Module) -> list[str]:
    """The features of a timm ViT that our ReViT cannot express, named as users know them."""
    cls = type(model).__name__
    if cls not in TIMM_CLASSES:
        return [f"model class {cls} (only timm's VisionTransformer, DeiT's "
                f"VisionTransformerDistilled and Eva)"]
    found = []
    eva = cls == "Eva"
    if eva:
        found += eva_problems(model)
    pool = getattr(model, "global_pool", "token")
    if pool not in POOLS:
        found.append("attention pooling (global_pool='map')" if pool == "map"
                     else f"global_pool={pool!r}")
    if getattr(model, "pos_embed", None) is None and getattr(model, "rope", None) is None:
        found.append("no position embedding")
    if getattr(model, "dynamic_img_size", False):
        found.append("dynamic_img_size")
    if not _is_identity(getattr(model, "patch_drop", None)):
        found.append("patch dropout")
    if pool == "map":
        found += attn_pool_problems(model.attn_pool, model.embed_dim)
    if not _is_identity(getattr(model.patch_embed, "norm", None)):
        found.append("a norm in the patch embedding")
    pre_norm = not _is_identity(getattr(model, "norm_pre", None))
    if (model.patch_embed.proj.bias is None) != pre_norm:  # timm ties the two (CLIP)
        found.append("a patch-embedding bias with pre-norm" if pre_norm
                     else "no patch-embedding bias")
    if not _is_identity(getattr(model, "head_hidden", None)) or not _is_identity(
            getattr(model, "pre_logits", None)):
        found.append("a pre-logits layer (representation_size)")
    norms = [m for m in (model.norm, getattr(model, "fc_norm", None)) if not _is_identity(m)]
    if len(norms) != 1:
        found.append("no final norm" if not norms else "both a final norm and fc_norm")
    if pre_norm:
        norms.append(model.norm_pre)
    for i, blk in enumerate(model.blocks):
        kind = type(blk).__name__
        if kind != ("EvaBlock" if eva else "Block"):
            found.append("parallel blocks" if "Parallel" in kind else
                         "post-norm blocks" if "PostNorm" in kind else f"block class {kind}")
            continue
        a, mlp = blk.attn, blk.mlp
        norms += [blk.norm1, blk.norm2]
        if eva:
            found += eva_attention_problems(a, blk, model)
        if _is_identity(getattr(a, "q_norm", None)) != _is_identity(getattr(a, "k_norm", None)):
            found.append("a norm on q or on k alone")
        elif not _is_identity(getattr(a, "q_norm", None)):
            norms += [a.q_norm, a.k_norm]
        if not _is_identity(getattr(a, "norm", None)):
            norms.append(a.norm)  # scale_attn_norm / scale_attn_inner
        if getattr(a, "gate", None) is not None:
            found.append("gated attention")
        if a.proj.bias is None:
            found.append("no attention output (proj) bias")
        found += mlp_problems(mlp)
        if not _is_identity(getattr(mlp, "norm", None)):
            norms.append(mlp.norm)
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        found.append("a norm that is not a LayerNorm (" + ", ".join(sorted(
            {type(n).__name__ for n in norms if not isinstance(n, nn.LayerNorm)})) + ")")
    elif len({n.eps for n in norms}) > 1:
        found.append(f"LayerNorms with different eps ({sorted({n.eps for n in norms})})")
    return list(dict.fromkeys(found))


def mlp_problems(mlp: nn.Module) -> list[str]:
    """What of a timm block's MLP ReViT's Mlp does not express: it takes timm's Mlp (exact
    GELU or QuickGELU), the packed SwiGLU (GluMlp: SiLU, gate rows first) and SwiGLU (gate and
    value layers of their own), each with biases and with or without a norm over the hidden
    units (timm's scale_mlp)."""
    kind = type(mlp).__name__
    found = []
    if kind == "GluMlp":
        if type(mlp.act) is not nn.SiLU or mlp.gate_last:
            found.append("a gated MLP other than SwiGLUPacked (SiLU, gate first)")
        layers = (mlp.fc1, mlp.fc2)
    elif kind == "SwiGLU":
        if type(mlp.act) is not nn.SiLU:
            found.append(f"a SwiGLU MLP with activation {type(mlp.act).__name__} (only SiLU)")
        layers = (mlp.fc1_g, mlp.fc1_x, mlp.fc2)
    elif kind == "Mlp":
        if mlp_act_name(mlp.act) is None:
            found.append(f"MLP activation {type(mlp.act).__name__} (only exact GELU and "
                         f"QuickGELU)")
        layers = (mlp.fc1, mlp.fc2)
    else:
        return [f"MLP class {kind}"]
    if any(layer.bias is None for layer in layers):
        found.append("no MLP bias")
    return found


def eva_problems(model: nn.Module) -> list[str]:
    """What of a timm Eva (EVA-02, the RoPE ViTs) as a whole ReViT does not express."""
    found = []
    rope = model.rope
    if getattr(model, "rope_mixed", False):
        found.append("learned mixed rotary frequencies (rope_type 'mixed')")
    elif rope is not None and type(rope).__name__ != "RotaryEmbeddingCat":
        found.append(f"rotary embedding {type(rope).__name__} (only axial RotaryEmbeddingCat, "
                     f"rope_type 'cat')")
    elif rope is not None:
        grids = [rope.feat_shape] + ([rope.ref_feat_shape] if rope.ref_feat_shape else [])
        if rope.in_pixels or rope.grid_type != "index" or rope.grid_offset:
            found.append("rotary frequencies over pixels or an offset grid (in_pixels, "
                         "rope_grid_offset)")
        if rope.aug_active:
            found.append("rotary coordinate augmentation (rope_shift/jitter/rescale_coords)")
        if rope.feat_shape is None or any(g[0] != g[1] for g in grids):
            found.append("a rotary grid that is not fixed and square (dynamic_img_size)")
    if model.global_pool == "map":
        found.append("attention pooling in an Eva model")
    return found


def eva_attention_problems(a: nn.Module, blk: nn.Module, model: nn.Module) -> list[str]:
    """What of one timm Eva block's attention and LayerScale ReViT does not express."""
    found = []
    if getattr(a, "num_kv_groups", 1) != 1:
        found.append("grouped-query attention (num_kv_heads)")
    if (blk.gamma_1 is None) != (blk.gamma_2 is None):
        found.append("LayerScale on one branch only (attn_only_layer_scale)")
    rope = model.rope
    if type(rope).__name__ == "RotaryEmbeddingCat":  # others are refused as a whole
        if a.head_dim != rope.dim:
            found.append(f"a rotary table {rope.dim} wide on heads {a.head_dim} wide")
        if bool(getattr(a, "rotate_half", False)) != bool(rope.rotate_half):
            found.append("a rotation layout other than the table's")
    if a.num_prefix_tokens != model.num_prefix_tokens:
        found.append("rotary embedding over some prefix tokens")
    return found


def attn_pool_problems(pool: nn.Module, embed_dim: int) -> list[str]:
    """What of a timm AttentionPoolLatent our AttentionPool does not express."""
    found = []
    if type(pool).__name__ != "AttentionPoolLatent":
        return [f"attention pooling {type(pool).__name__}"]
    if pool.latent_len != 1 or pool.pool != "token":
        found.append("an attention pool with more than one latent query")
    if pool.pos_embed is not None:
        found.append("an attention pool with its own position embedding")
    if not _is_identity(pool.q_norm) or isinstance(pool.q, nn.Identity):
        found.append("an attention pool with qk-norm or without its q projection")
    if pool.latent.shape[-1] != embed_dim or pool.mlp is None or pool.proj.out_features != embed_dim:
        found.append("an attention pool of other widths than the stream's")
    elif type(pool.mlp).__name__ != "Mlp" or mlp_act_name(pool.mlp.act) is None:
        found.append("an attention pool whose MLP is not an exact-GELU or QuickGELU Mlp")
    return found


def mlp_act_name(act: nn.Module, mlp: nn.Module | None = None) -> str | None:
    """Dims' name of a timm MLP's activation (None: one we do not cover)."""
    if mlp is not None and type(mlp).__name__ in ("GluMlp", "SwiGLU"):
        return "swiglu_packed" if type(mlp).__name__ == "GluMlp" else "swiglu"
    from timm.layers import QuickGELU
    from timm.layers.activations import GELU  # what timm builds for act_layer="gelu"
    if (type(act) is nn.GELU and act.approximate == "none") or type(act) is GELU:
        return "gelu"
    return "quick_gelu" if type(act) is QuickGELU else None


def _attn_scale(attn: nn.Module, head_dim: int) -> float:
    """The scale timm's forward really applies: SDPA's default on the fused path."""
    if getattr(attn, "fused_attn", False):
        return 1.0 / math.sqrt(head_dim)  # as Dims' default, so the same number
    return float(attn.scale)


def timm_vit_dims(model: nn.Module, name: str | None = None) -> Dims:
    """Our Dims of a (possibly pruned) timm VisionTransformer, read from its layer shapes.

    Refuses a model with a feature we do not cover (UserError naming it); `name` is what
    the message calls the model.
    """
    what = name or f"this timm {type(model).__name__}"
    found = unsupported_features(model)
    if found:
        raise UserError(f"{what} is not supported: {'; '.join(found)}", field="name")
    pe = model.patch_embed
    heads, head_dims, mlps, scales = [], [], [], []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        H = int(a.num_heads)
        out = a.qkv.out_features if a.qkv is not None else 3 * a.q_proj.out_features
        if out % (3 * H):
            raise UserError(f"{what}: block {i} qkv width {out} is not 3 x {H} heads x head "
                            f"dim (was attn.num_heads updated after pruning?)", field="name")
        d = out // (3 * H)
        heads.append(H)
        head_dims.append(d)
        mlp = blk.mlp
        mlps.append(mlp.fc1_g.out_features if type(mlp).__name__ == "SwiGLU" else
                    mlp.fc1.out_features // (2 if type(mlp).__name__ == "GluMlp" else 1))
        scales.append(_attn_scale(a, d))
    blk = model.blocks[0]
    eva = type(model).__name__ == "Eva"
    if eva:
        layer_scale = 0.0 if blk.gamma_1 is None else float(blk.init_values or 1e-5)
        reg_tokens = 0 if model.reg_token is None else int(model.reg_token.shape[1])
    else:
        layer_scale = 0.0 if _is_identity(blk.ls1) else float(getattr(blk.ls1, "init_values", 1e-5))
        reg_tokens = int(model.num_reg_tokens)
    return Dims(pe.proj.out_channels, heads, head_dims, list(head_dims), mlps, attn_scale=scales,
                img_size=_size(pe.img_size), patch_size=_size(pe.patch_size),
                in_chans=pe.proj.in_channels, num_classes=model.num_classes,
                distilled=getattr(model, "dist_token", None) is not None,
                class_token=model.cls_token is not None, reg_tokens=reg_tokens,
                layer_scale=layer_scale, **_bias_fields(blk.attn), **_eva_fields(model),
                no_embed_class=bool(model.no_embed_class), global_pool=model.global_pool,
                fc_norm=not _is_identity(model.fc_norm),
                pre_norm=not _is_identity(getattr(model, "norm_pre", None)),
                ln_eps=float(blk.norm1.eps), mlp_act=mlp_act_name(blk.mlp.act, blk.mlp),
                qk_norm=not _is_identity(getattr(blk.attn, "q_norm", None)),
                mlp_norm=not _is_identity(getattr(blk.mlp, "norm", None)),
                attn_norm=not _is_identity(getattr(blk.attn, "norm", None)),
                qkv_fused=blk.attn.qkv is not None,
                **_pool_fields(model))


def _bias_fields(attn: nn.Module) -> dict:
    """qkv_bias and k_bias: Eva's attention holds Q and V biases and no K bias."""
    if getattr(attn, "q_bias", None) is not None:
        return dict(qkv_bias=True, k_bias=False)
    if attn.qkv is None:  # separate projections
        return dict(qkv_bias=attn.q_proj.bias is not None, k_bias=attn.k_proj.bias is not None
                    or attn.q_proj.bias is None)
    if type(attn).__name__ == "EvaAttention":
        return dict(qkv_bias=False, k_bias=False)
    return dict(qkv_bias=attn.qkv.bias is not None)


def _eva_fields(model: nn.Module) -> dict:
    """The layout, position embedding and rotary fields of a timm Eva (none for a ViT)."""
    if type(model).__name__ != "Eva":
        return {}
    out = dict(layout="eva", abs_pos_embed=model.pos_embed is not None)
    rope = model.rope
    if rope is not None:
        out.update(rope_dim=int(rope.dim), rope_temperature=float(rope.temperature),
                   rope_grid_indexing=rope.grid_indexing, rope_half=bool(rope.rotate_half),
                   rope_ref_grid=int(rope.ref_feat_shape[0]) if rope.ref_feat_shape else 0)
    return out


def _pool_fields(model: nn.Module) -> dict:
    pool = getattr(model, "attn_pool", None)
    if model.global_pool != "map":
        return {}
    return dict(pool_dim=pool.q.out_features, pool_heads=int(pool.num_heads),
                pool_mlp_dim=pool.mlp.fc1.out_features)


def timm_vit_to_nvit(model: nn.Module) -> tuple[Dims, dict[str, torch.Tensor]]:
    """(Dims, state dict) of our ReViT computing what the timm ViT computes.

    Heads, head width and MLP width may differ per block (as global pruning leaves them);
    the attention scale of every block is kept as the timm model applies it.
    """
    dims = timm_vit_dims(model)
    with torch.device("meta"):  # only the key names are needed
        own = ReViT(dims)
    keys = set(own.state_dict())
    return dims, {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}


def load_nvit(dims: Dims, state: dict[str, torch.Tensor]) -> ReViT:
    """Our model from a converted (dims, state dict); strict, so nothing is silently lost."""
    model = ReViT(dims)
    model.load_state_dict(state, strict=True)
    return model


def nvit_to_timm_vit(model: ReViT) -> nn.Module:
    """A timm VisionTransformer (VisionTransformerDistilled for a distilled model) with the
    weights of a uniform ReViT with QK width = V width, whatever its family fields."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.layers import SwiGLU, SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer
    d = model.dims
    if not d.is_uniform or d.qk_dim[0] != d.v_dim[0]:
        raise ValueError("timm's VisionTransformer needs uniform dims with QK width = V width")
    if d.token_scale:
        raise ValueError("timm's VisionTransformer has no per-token scale (the NViT reference's)")
    H, hd, M = d.num_heads[0], d.qk_dim[0], d.mlp_dim[0]
    if d.global_pool == "map" and (d.pool_dim, d.pool_heads, d.pool_mlp_dim) != (d.embed_dim, H, M):
        raise ValueError("timm's attention pool has the model's width, heads and MLP width")
    if abs(d.attn_scale[0] - hd ** -0.5) > 1e-12:
        raise ValueError("timm's attention scale is 1/sqrt(head dim); this model uses another")
    if d.layout == "eva":
        vit = _timm_eva(d, H, hd, M)
    else:
        cls = VisionTransformerDistilled if d.distilled else VisionTransformer
        if not d.qkv_fused or not d.k_bias:
            raise ValueError("timm's VisionTransformer has one qkv with a bias on every row")
        layer = {"swiglu_packed": SwiGLUPacked, "swiglu": SwiGLU}.get(d.mlp_act)
        vit = cls(img_size=d.img_size, patch_size=d.patch_size, in_chans=d.in_chans,
                  num_classes=d.num_classes, global_pool=d.global_pool, embed_dim=d.embed_dim,
                  depth=d.depth, num_heads=H, qkv_bias=d.qkv_bias, scale_mlp_norm=d.mlp_norm,
                  scale_attn_norm=d.attn_norm,
                  mlp_ratio=M * (2 if d.mlp_act == "swiglu_packed" else 1) / d.embed_dim,
                  **({"mlp_layer": layer} if layer is not None else {}),
                  class_token=d.class_token, reg_tokens=d.reg_tokens,
                  init_values=d.layer_scale or None, no_embed_class=d.no_embed_class,
                  fc_norm=d.fc_norm, pre_norm=d.pre_norm, qk_norm=d.qk_norm,
                  norm_layer=functools.partial(nn.LayerNorm, eps=d.ln_eps),
                  act_layer={"gelu": nn.GELU, "swiglu_packed": nn.SiLU,
                             "swiglu": nn.SiLU}.get(d.mlp_act, d.mlp_act))
    for blk in vit.blocks:  # head width need not be embed / heads
        if blk.attn.head_dim != hd or blk.mlp.fc2.in_features != M:
            raise ValueError("timm built other widths than the ReViT has")
    vit.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True)
    return vit.train(model.training)


def _timm_eva(d: Dims, H: int, hd: int, M: int) -> nn.Module:
    """timm's Eva with a uniform eva-layout ReViT's structure (its rotary table as wide as a
    head, as timm builds it)."""
    from timm.models.eva import Eva
    if d.embed_dim != H * hd or (d.rope_dim and (d.rope_dim != hd or d.rope_dims is not None)):
        raise ValueError("timm's Eva has heads embed / heads wide, rotated by the whole table")
    if (d.distilled or d.global_pool == "map" or d.mlp_act == "quick_gelu"
            or (d.mlp_act == "swiglu_packed" and d.mlp_norm)):
        raise ValueError("timm's Eva has no distillation token, attention pool, QuickGELU or "
                         "packed SwiGLU with a norm here")
    ref = d.rope_ref_grid
    return Eva(img_size=d.img_size, patch_size=d.patch_size, in_chans=d.in_chans,
               num_classes=d.num_classes, global_pool=d.global_pool, embed_dim=d.embed_dim,
               depth=d.depth, num_heads=H, qkv_bias=d.qkv_bias, qkv_fused=d.qkv_fused,
               attn_type="eva" if not d.k_bias else "rope", qk_norm=d.qk_norm,
               mlp_ratio=M / d.embed_dim, swiglu_mlp=d.mlp_act.startswith("swiglu"),
               scale_mlp=d.mlp_norm, swiglu_align_to=int(d.mlp_act == "swiglu"),
               scale_attn_inner=d.attn_norm,
               init_values=d.layer_scale or None, class_token=d.class_token,
               num_reg_tokens=d.reg_tokens, no_embed_class=d.no_embed_class,
               use_abs_pos_emb=d.abs_pos_embed, use_rot_pos_emb=bool(d.rope_dim),
               rope_temperature=d.rope_temperature, rope_grid_indexing=d.rope_grid_indexing,
               rope_rotate_half=d.rope_half, ref_feat_shape=(ref, ref) if ref else None,
               use_pre_transformer_norm=d.pre_norm, use_fc_norm=d.fc_norm,
               use_post_transformer_norm=not d.fc_norm,
               norm_layer=functools.partial(nn.LayerNorm, eps=d.ln_eps))
