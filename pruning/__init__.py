"""Global structural pruning of ReViT: gates, saliency scores and compaction."""
from .compact import compact, compacted_dims
from .gates import Gates
from .saliency import CRITERIA, DEFAULT_SCALES, Saliency
from .units import KINDS

__all__ = ["CRITERIA", "DEFAULT_SCALES", "KINDS", "Gates", "Saliency", "compact",
           "compacted_dims"]
