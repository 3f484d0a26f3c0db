"""Unit scales derived from the model and its cost (`--unit-scales auto`).

The saliency divides a unit's summed `gate * dL/dgate` by its kind's scale before the
criterion squares it (hessian) or takes its size (taylor), so one global ranking can compare
an embedding channel with an MLP neuron. The NViT reference fixed the scales for DeiT-B
(embedding 12, head 12, QK 2, V 2, MLP 1). `auto_scales` derives them from the model being
pruned instead: with Delta_k the cost (the run's own cost model: MACs, parameters or a
latency table) that removing one unit of kind k saves, averaged over the kind's layers at
the dense widths, the scale of kind k is (Delta_k / Delta_mlp)^(1/p), p = 2 for the hessian
criterion and 1 for taylor. The ranked score is then the estimated loss increase per unit of
cost saved, relative to an MLP neuron's: the ranking asks "what is cheapest to lose for what
it saves", which is what a cost target needs, whatever the model's proportions.
"""
from __future__ import annotations

from .gates import widths_to_dims
from .units import BLOCK_KINDS, MODEL_KINDS, UNIT_KINDS, model_kinds, unit_width, width_of

SCORE_POWERS = {"hessian": 2, "taylor": 1}  # the criteria whose scores the scales divide


def _dense_widths(dims) -> dict:
    return {"embed_dim": dims.embed_value(list(dims.streams)),
            **{UNIT_KINDS[k].width: list(getattr(dims, UNIT_KINDS[k].width)) for k in BLOCK_KINDS},
            **{UNIT_KINDS[k].width: width_of(dims, k, 0) for k in model_kinds(dims)}}


def unit_savings(cost, dims, group_sizes: dict[str, int], qkv_units: str = "shared"
                 ) -> dict[str, float]:
    """Per kind, the cost one unit's removal saves, averaged over the kind's layers: each layer
    loses one group (its group size, at most all but one unit), and the saving is divided by
    the units removed (a latency table reads flat over a single unit). A per-head QK or V unit
    is one head's dim: a shared one's saving over the block's heads."""
    total = cost.total(dims)
    out = {}
    for kind in ("emb", *BLOCK_KINDS, *model_kinds(dims)):
        savings = []
        if kind == "emb":
            layers = [(s, w) for s, w in enumerate(dims.streams)]
        elif kind in MODEL_KINDS:
            layers = [(0, width_of(dims, kind, 0))]
        else:
            layers = list(enumerate(getattr(dims, UNIT_KINDS[kind].width)))
        for layer, width in layers:
            step = unit_width(dims, kind)  # a rotary QK unit is two dims
            n = min(int(group_sizes.get(kind, 1)), width // step - 1)
            if n < 1:
                continue
            widths = _dense_widths(dims)
            if kind == "emb":
                streams = list(dims.streams)
                streams[layer] -= n
                widths["embed_dim"] = dims.embed_value(streams)
            elif kind in MODEL_KINDS:
                widths[UNIT_KINDS[kind].width] = width - n
            else:
                widths[UNIT_KINDS[kind].width][layer] -= n * step
            saved = (total - cost.total(widths_to_dims(widths, dims))) / n
            if kind in ("qk", "v") and qkv_units == "per_head":
                saved /= dims.num_heads[layer]
            savings.append(saved)
        out[kind] = sum(savings) / len(savings) if savings else 0.0
    return out


def auto_scales(cost, dims, criterion: str, group_sizes: dict[str, int],
                qkv_units: str = "shared") -> dict[str, float]:
    """Each kind's scale, (Delta_k / Delta_mlp)^(1/p) (module docstring); refuses a criterion
    that does not divide by scales and a cost that saves nothing for some kind."""
    if criterion not in SCORE_POWERS:
        raise ValueError(f"unit scales divide the {' and '.join(SCORE_POWERS)} criteria's "
                         f"scores; the {criterion} criterion does not use them")
    saved = unit_savings(cost, dims, group_sizes, qkv_units)
    for kind in model_kinds(dims):  # a latency table does not time the pool MLP's widths:
        if saved[kind] <= 0:  # its neurons then take the blocks' MLP neurons' scale
            saved[kind] = saved["mlp"]
    flat = [k for k, v in saved.items() if v <= 0]
    if flat:
        raise ValueError(f"the {cost.name} cost saves nothing when a unit of {', '.join(flat)} "
                         f"is removed (a latency table flat there?), so no scale can be derived "
                         f"from it")
    power = SCORE_POWERS[criterion]
    return {k: (v / saved["mlp"]) ** (1.0 / power) for k, v in saved.items()}
