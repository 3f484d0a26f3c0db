"""The per-block-dims model families: DeiT/ViT (ReViT / NViT) and Swin (ReSwin), and their
loading from timm, DeiT and Microsoft weights."""
from . import registry  # noqa: F401  (registers the revit_* and reswin names with timm)
from .checkpoint import read_checkpoint
from .dims import Dims, revit_dims
from .factory import (architecture_of, build_model, dims_from_dict, load_dims, model_class,
                      name_dims, planned_img_size)
from .revit import ReViT
from .swin import ReSwin
from .swin_dims import SwinDims

__all__ = ["Dims", "ReSwin", "ReViT", "SwinDims", "architecture_of", "build_model",
           "dims_from_dict", "load_dims", "model_class", "name_dims", "planned_img_size",
           "read_checkpoint", "revit_dims"]
