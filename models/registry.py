"""timm registration, so `timm.create_model('revit_tiny_distilled_patch16_224')` works."""
from __future__ import annotations

from timm.models import register_model

from errors import UserError

from .dims import FRAME_FIELDS, Dims, revit_dims
from .revit import ReViT

_DEFAULT_FRAME = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, distilled=True)
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create(name: str, dims: Dims, pretrained: bool, kwargs: dict) -> ReViT:
    for key in _TIMM_ONLY:
        kwargs.pop(key, None)
    if pretrained:
        raise UserError(f"{name} has no published weights; load a checkpoint with "
                        f"models.build_model(..., checkpoint=FILE) instead")
    frame = {k: kwargs.pop(k) for k in FRAME_FIELDS if k in kwargs}
    dims = dims.with_frame(**{k: v for k, v in _DEFAULT_FRAME.items() if getattr(dims, k) is None})
    return ReViT(dims.with_frame(**frame), **kwargs)


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
    """Any per-block dims: `dims` is a Dims, a dict of its fields, or a YAML/JSON file path."""
    if dims is None:
        raise UserError("timm.create_model('revit', dims=...) needs a dims spec")
    if isinstance(dims, dict):
        dims = Dims.from_dict(dims)
    elif not isinstance(dims, Dims):
        dims = Dims.load(dims)
    return _create("revit", dims, pretrained, kwargs)
