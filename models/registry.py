"""timm registration, so `timm.create_model('revit_tiny_distilled_patch16_224')` works, through
timm's own builder: pretrained_cfg/default_cfg, `features_only=True` (feature extraction by
`forward_intermediates`) and the other `create_model` arguments behave as for timm's ViTs."""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from errors import UserError

from .dims import FAMILY_FIELDS, FRAME_FIELDS, Dims, revit_dims
from .revit import ReViT, pretrained_cfg
from .swin import ReSwin, pretrained_cfg as swin_pretrained_cfg
from .swin_dims import SwinDims

_DEFAULT_FRAME = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, distilled=True)
_SHAPES = {"revit_tiny_distilled_patch16_224": 176, "revit_small_distilled_patch16_224": 384}

# timm reads a module's default_cfgs when register_model runs below
# Swin-T's shape: what `reswin` builds without dims (as every timm name, it builds alone)
_SWIN_T = SwinDims([96, 192, 384, 768], [2, 2, 6, 2], [3, 3, 6, 6] + [12] * 6 + [24, 24], 32, 32,
                   [384, 384, 768, 768] + [1536] * 6 + [3072, 3072], 7, img_size=224,
                   patch_size=4, in_chans=3, num_classes=1000)
default_cfgs = generate_default_cfgs({
    **{name: pretrained_cfg(revit_dims(emb).with_frame(**_DEFAULT_FRAME))
       for name, emb in {**_SHAPES, "revit": 176}.items()},  # revit: overlaid by its dims
    "reswin": swin_pretrained_cfg(_SWIN_T)})


def _has_source(cfg) -> bool:
    """Whether timm resolved weights to load for this call: a hub folder (`local-dir:`) or a
    hub repo (`hf-hub:`) whose config names our architecture."""
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {})
    return isinstance(cfg, dict) and bool(cfg.get("file") or cfg.get("hf_hub_id"))


def _create(name: str, dims: Dims | SwinDims, pretrained: bool, kwargs: dict) -> ReViT | ReSwin:
    if pretrained and not _has_source(kwargs.get("pretrained_cfg")):
        raise UserError(f"{name} has no published weights; load a checkpoint with "
                        f"models.build_model(..., checkpoint=FILE), or a folder written by "
                        f"the export tool with timm.create_model('local-dir:FOLDER', "
                        f"pretrained=True)")
    # the frame and the family fields may come as timm's kwargs too (a hub folder's config
    # restates them): they describe these dims
    swin = isinstance(dims, SwinDims)
    fields = ((*FRAME_FIELDS, "global_pool") if swin else (*FRAME_FIELDS, *FAMILY_FIELDS))
    frame = {k: kwargs.pop(k) for k in fields if k in kwargs}
    if swin:
        frame.pop("distilled", None)
    else:
        dims = dims.with_frame(**{k: v for k, v in _DEFAULT_FRAME.items()
                                  if getattr(dims, k) is None})
    dims = dims.with_frame(**frame)
    # the cfg describes these dims (input size, classes, heads), whatever cfg timm resolved
    # for the name; a caller's overlay still wins
    cfg = swin_pretrained_cfg(dims) if swin else pretrained_cfg(dims)
    own = {k: v for k, v in cfg.items() if v is not None}  # keep the source
    kwargs["pretrained_cfg_overlay"] = {**own, **(kwargs.get("pretrained_cfg_overlay") or {})}
    cls = ReSwin if swin else ReViT

    def build(**model_kwargs) -> ReViT | ReSwin:
        for key in fields:
            model_kwargs.pop(key, None)  # already in dims
        return cls(dims, **model_kwargs)
    # features_only: as timm's models, the last 3 blocks of a ViT, every stage of a Swin,
    # unless out_indices says otherwise
    out_indices = kwargs.pop("out_indices", tuple(range(dims.num_stages)) if swin else 3)
    return build_model_with_cfg(build, name, pretrained=pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **kwargs)


@register_model
def revit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs) -> ReViT:
    """ReViT at EMB 176 (5.3M parameters at 224 px): the NViT paper's DeiT-T-sized shape."""
    return _create("revit_tiny_distilled_patch16_224", revit_dims(176), pretrained, kwargs)


@register_model
def revit_small_distilled_patch16_224(pretrained: bool = False, **kwargs) -> ReViT:
    """ReViT at EMB 384 (23.1M parameters at 224 px): the NViT paper's DeiT-S-sized shape."""
    return _create("revit_small_distilled_patch16_224", revit_dims(384), pretrained, kwargs)


@register_model
def revit(pretrained: bool = False, dims: Dims | dict | str | None = None, **kwargs) -> ReViT:
    """Any per-block dims: `dims` is a Dims, a dict of its fields, or a YAML/JSON file path;
    without one, ReViT-T's (as every timm name, it builds with its defaults)."""
    if dims is None:
        dims = revit_dims(_SHAPES["revit_tiny_distilled_patch16_224"])
    elif isinstance(dims, dict):
        dims = Dims.from_dict(dims)
    elif not isinstance(dims, Dims):
        dims = Dims.load(dims)
    return _create("revit", dims, pretrained, kwargs)


@register_model
def reswin(pretrained: bool = False, dims: SwinDims | dict | str | None = None, **kwargs) -> ReSwin:
    """A Swin (v1 or v2) of any per-stage and per-block dims: `dims` is a SwinDims, a dict of
    its fields, or a YAML/JSON file path; without one, Swin-T's."""
    from .factory import dims_from_dict, load_dims
    if dims is None:
        dims = _SWIN_T
    elif isinstance(dims, dict):
        dims = dims_from_dict(dims)
    elif not isinstance(dims, SwinDims):
        dims = load_dims(dims)
    if not isinstance(dims, SwinDims):
        raise UserError("reswin needs Swin dims (with depths per stage); a ViT's are revit's")
    return _create("reswin", dims, pretrained, kwargs)
