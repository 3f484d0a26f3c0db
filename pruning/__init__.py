"""Global structural pruning of ReViT: gates, saliency scores and compaction."""
from .compact import compact, compacted_dims
from .gates import KINDS, Gates
from .saliency import CRITERIA, DEFAULT_SCALES, Saliency

__all__ = ["CRITERIA", "DEFAULT_SCALES", "KINDS", "Gates", "Saliency", "compact",
           "compacted_dims"]
