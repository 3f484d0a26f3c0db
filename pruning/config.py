"""Pruning settings from a config mapping: nvit's own format or the NViT reference's.

nvit format: {"criterion", "group_sizes", "scales", "momentum"} (configs/nvit_reference.json).

Reference format (NVlabs/NViT `nvit/pruning_configs/*.json`, read by its `PruningConfigReader`,
optionally nested under "jobConfiguration"): each key means what it meant in the reference's
pruning run. `method` 23 is the Hessian criterion of the paper (the only one the reference
could run on a ViT besides weight norm, which nvit does not reproduce); `pruning_momentum`
is the EMA momentum. Keys that pruning run overrode from its command line or never used
are accepted and listed in `ignored`; keys it used are accepted at the values that keep its
default behaviour and refused otherwise. Group sizes and scales are the reference's fixed
ones. Errors are ValueErrors; callers name the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .units import KINDS
from .pruner import DEFAULT_GROUP_SIZES
from .saliency import CRITERIA, DEFAULT_SCALES

NVIT_KEYS = ("criterion", "group_sizes", "scales", "momentum")
REFERENCE_METHODS = {23: "hessian"}
# used by the reference's pruning run, supported here at the value that keeps its behaviour
REFERENCE_FIXED = {"fixed_layer": -1, "start_pruning_after_n_iterations": 0,
                   "fixed_criteria": False, "reset_gates": False,
                   "leave_at_least_one_group": True, "push_down": False}
# overridden by main_full_global_latency.py's flags, logging only, or never read there
REFERENCE_IGNORED = ("frequency", "prune_per_iteration", "maximum_pruning_iterations",
                     "prune_neurons_max", "group_size", "pruning_threshold",
                     "latency_regularization", "latency_look_up_table", "flops_regularization",
                     "params_regularization", "starting_neuron", "seed", "do_iterative_pruning",
                     "do_after_step", "set_moment_zero", "push_down_weight_decay",
                     "l2_normalization_per_layer", "rank_neurons_equally", "use_momentum",
                     "pruning_silent", "push_group_down")


@dataclass
class PruningConfig:
    criterion: str = "hessian"
    group_sizes: dict = field(default_factory=lambda: dict(DEFAULT_GROUP_SIZES))
    scales: dict = field(default_factory=lambda: dict(DEFAULT_SCALES))
    momentum: float = 0.9
    ignored: tuple = ()  # reference keys with no effect, for the caller to name

    def as_dict(self) -> dict:
        """What a resumed run must share with the original."""
        return {"criterion": self.criterion, "group_sizes": dict(self.group_sizes),
                "scales": dict(self.scales), "momentum": self.momentum}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _momentum(value) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {value!r}")
    return float(value)


def parse_config(data) -> PruningConfig:
    """A PruningConfig from the JSON content of either format."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if isinstance(data.get("jobConfiguration"), dict):
        data = data["jobConfiguration"]
    if "method" in data or set(data) & (set(REFERENCE_IGNORED) | set(REFERENCE_FIXED)):
        return _reference(data)
    unknown = sorted(set(data) - set(NVIT_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}: expected nvit's keys {list(NVIT_KEYS)} or "
                         f"an NViT reference config (with 'method')")
    config = PruningConfig()
    criterion = data.get("criterion", config.criterion)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    config.criterion = criterion
    for key in ("group_sizes", "scales"):
        value = data.get(key, {})
        if not isinstance(value, dict) or set(value) - set(KINDS) or \
                not all(_is_number(v) and v > 0 for v in value.values()):
            raise ValueError(f"{key} must map kinds {KINDS} to positive numbers, got {value!r}")
        if key == "group_sizes" and not all(float(v).is_integer() for v in value.values()):
            raise ValueError(f"group_sizes must be integers, got {value!r}")
    config.group_sizes.update({k: int(v) for k, v in data.get("group_sizes", {}).items()})
    config.scales.update({k: float(v) for k, v in data.get("scales", {}).items()})
    config.momentum = _momentum(data.get("momentum", config.momentum))
    return config


def _reference(data: dict) -> PruningConfig:
    known = {"method", "pruning_momentum", *REFERENCE_FIXED, *REFERENCE_IGNORED}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for an NViT reference pruning config")
    method = data.get("method", 0)  # the reference's default when the key is absent
    if method not in REFERENCE_METHODS:
        raise ValueError(f"method {method!r} is not supported: nvit implements method 23 (the "
                         f"Hessian criterion of the paper); for baselines use nvit's config "
                         f"format with criterion one of {CRITERIA}")
    for key, keep in REFERENCE_FIXED.items():
        if key in data and data[key] != keep:
            raise ValueError(f"{key} {data[key]!r} is not supported (only {keep!r}, the value the "
                             f"NViT reference's own configs use)")
    return PruningConfig(criterion=REFERENCE_METHODS[method],
                         momentum=_momentum(data.get("pruning_momentum", 0.9)),
                         ignored=tuple(k for k in REFERENCE_IGNORED if k in data))
