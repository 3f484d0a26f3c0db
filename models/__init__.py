"""The per-block-dims DeiT family (ReViT / NViT) and its loading from timm and DeiT weights."""
from . import registry  # noqa: F401  (registers the revit_* names with timm)
from .checkpoint import read_checkpoint
from .dims import Dims, revit_dims
from .factory import build_model, name_dims, planned_img_size
from .revit import ReViT

__all__ = ["Dims", "ReViT", "build_model", "name_dims", "planned_img_size", "read_checkpoint", "revit_dims"]
