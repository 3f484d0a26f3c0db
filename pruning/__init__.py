"""Global structural pruning of ReViT: the unit map, gates, saliency, cost models, the global
pruner, the pruning loop, compaction, and timing in the deploy runtime; `import pruning` gives the public interface."""
from .compact import compact, compacted_dims, feature_channels
from .scales import auto_scales
from .config import PruningConfig, parse_config
from .cost import (CostModel, LatencyTable, MacsCost, ParamsCost, build_cost_model,
                   precision_name)
from .gates import EMB_SALIENCY, QKV_UNITS, Gates
from .latency import measure_table, report_lines, speed_report
from .loop import PruningLoop
from .pruner import DEFAULT_GROUP_SIZES, DEFAULT_PACE, GlobalPruner
from .runtimes import RUNTIMES, deploy_dtype
from .saliency import CRITERIA, DEFAULT_SCALES, Saliency
from .units import KINDS, UNIT_KINDS, clear_pruned_state

__all__ = ["CRITERIA", "DEFAULT_GROUP_SIZES", "DEFAULT_PACE", "DEFAULT_SCALES", "EMB_SALIENCY",
           "KINDS", "QKV_UNITS", "RUNTIMES", "UNIT_KINDS", "CostModel", "Gates", "GlobalPruner",
           "LatencyTable", "MacsCost", "ParamsCost", "PruningConfig", "PruningLoop", "Saliency",
           "auto_scales", "build_cost_model", "clear_pruned_state", "compact", "compacted_dims", "feature_channels",
           "deploy_dtype", "measure_table", "parse_config", "precision_name", "report_lines", "speed_report"]
