"""The unit map: what each prunable unit kind consists of, written once.

A unit kind (embedding channel, head, QK dim, V dim, MLP neuron) is a width of the model
(a Dims field) and a set of parameter slices: which parameter, along which axis, in which
head-major segment of that axis (the Q, K or V rows of `attn.qkv`; the V columns of
`attn.proj`), whether a unit *produces* it (output rows: what magnitude scores and what the
gate's value is folded into) or *consumes* it (input columns), and whether the kind's gate
multiplies it in the forward pass (`models/revit.py` applies the gates; this table says what
they mean). Gate shapes, magnitude scores, compaction, optimizer-state clean-up and the
pruner's width bookkeeping are derived from it, and each refuses a model parameter that the
map neither covers nor lists in `UNPRUNED` (a new parameter cannot be skipped silently).
The timm family's extra parameters are entries like any other: LayerScale gammas are "emb"
produce slices of a block, register tokens and fc_norm model slices like `cls_token` and
`norm`. A slice whose parameter a model does not have (no qkv bias, no LayerScale, no class
token) is simply absent from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from models.dims import Dims


@dataclass(frozen=True)
class Slice:
    param: str  # model-level name ("pos_embed") or, for block slices, the name in a block
    axis: int
    role: str  # "produce" (output rows of the unit) or "consume" (input columns)
    segment: str | None = None  # "q", "k" or "v": those head-major rows/columns of the axis
    gated: bool = False  # the kind's gate multiplies this slice's contribution


@dataclass(frozen=True)
class UnitKind:
    name: str
    width: str  # the Dims field this kind prunes
    per_head: bool  # gate (heads, width) rather than (width,)
    block_slices: tuple[Slice, ...]
    model_slices: tuple[Slice, ...] = ()


def _p(param: str, axis: int, segment: str | None = None, gated: bool = True) -> Slice:
    return Slice(param, axis, "produce", segment, gated)


def _c(param: str, axis: int, segment: str | None = None) -> Slice:
    return Slice(param, axis, "consume", segment, False)


_QKV = ("attn.qkv.weight", "attn.qkv.bias")
UNIT_KINDS: dict[str, UnitKind] = {k.name: k for k in (
    UnitKind("emb", "embed_dim", False,
             block_slices=(_p("norm1.weight", 0), _p("norm1.bias", 0), _c("attn.qkv.weight", 1),
                           _p("attn.proj.weight", 0), _p("attn.proj.bias", 0), _p("ls1.gamma", 0),
                           _p("norm2.weight", 0), _p("norm2.bias", 0), _c("mlp.fc1.weight", 1),
                           _p("mlp.fc2.weight", 0), _p("mlp.fc2.bias", 0), _p("ls2.gamma", 0)),
             model_slices=(_p("patch_embed.proj.weight", 0), _p("patch_embed.proj.bias", 0),
                           _p("cls_token", 2), _p("dist_token", 2), _p("reg_token", 2),
                           _p("pos_embed", 2), _p("norm.weight", 0), _p("norm.bias", 0),
                           _p("fc_norm.weight", 0), _p("fc_norm.bias", 0),
                           _c("head.weight", 1), _c("head_dist.weight", 1))),
    # the head gate multiplies the head's q, k and v
    UnitKind("head", "num_heads", False,
             block_slices=tuple(_p(n, 0, s) for s in "qkv" for n in _QKV)
             + (_c("attn.proj.weight", 1, "v"),)),
    # the QK gate multiplies q only; removing a QK dim removes its k row as well
    UnitKind("qk", "qk_dim", True,
             block_slices=tuple(_p(n, 0, "q") for n in _QKV)
             + tuple(_p(n, 0, "k", gated=False) for n in _QKV)),
    UnitKind("v", "v_dim", True,
             block_slices=tuple(_p(n, 0, "v") for n in _QKV) + (_c("attn.proj.weight", 1, "v"),)),
    UnitKind("mlp", "mlp_dim", False,
             block_slices=(_p("mlp.fc1.weight", 0), _p("mlp.fc1.bias", 0),
                           _c("mlp.fc2.weight", 1))),
)}
KINDS = tuple(UNIT_KINDS)
BLOCK_KINDS = KINDS[1:]
# parameters no unit owns: classifier biases (class axis), per-token scales (token axis)
UNPRUNED = (re.compile(r"head(_dist)?\.bias"), re.compile(r"blocks\.\d+\.attn\.token_scale"))


# ------------------------------------------------------------------------- the model side
def gate_shape(kind: str, dims: Dims, block: int | None) -> tuple[int, ...]:
    """Shape of one gate tensor of this kind."""
    k = UNIT_KINDS[kind]
    if kind == "emb":
        return (dims.embed_dim,)
    width = getattr(dims, k.width)[block]
    return (dims.num_heads[block], width) if k.per_head else (width,)


def slices(model: torch.nn.Module, kind: str, block: int | None):
    """(full parameter name, Slice) pairs of one layer (the embedding: every block's too)."""
    k = UNIT_KINDS[kind]
    params = dict(model.named_parameters())
    blocks = range(len(model.blocks)) if block is None else [block]
    out = [(s.param, s) for s in k.model_slices if s.param in params]
    out += [(f"blocks.{i}.{s.param}", s) for i in blocks for s in k.block_slices
            if f"blocks.{i}.{s.param}" in params]
    return out


def segment(model: torch.nn.Module, name: str, s: Slice) -> tuple[int, int, int]:
    """(offset, heads, width per head) of a slice's segment along its axis; whole axis: (0, 1, n)."""
    if s.segment is None:
        return 0, 1, model.get_parameter(name).shape[s.axis]
    attn = model.get_submodule(name.split(".attn.")[0] + ".attn")
    H, qk, v = attn.num_heads, attn.qk_dim, attn.v_dim
    width = v if s.segment == "v" else qk
    offset = {"q": 0, "k": H * qk, "v": 2 * H * qk}[s.segment] if ".attn.qkv." in name else 0
    return offset, H, width


def check_covered(model: torch.nn.Module) -> None:
    """Raise if the model has a parameter the unit map does not account for."""
    covered = {name for kind in KINDS for name, _ in slices(model, kind, None)}
    for name, _ in model.named_parameters():
        if name not in covered and not any(p.fullmatch(name) for p in UNPRUNED):
            raise ValueError(f"the unit map (pruning/units.py) does not cover parameter {name!r}: "
                             f"say which unit kinds own it, or list it as unpruned")


def _rows_of(kind: str, gate: torch.Tensor, width: int) -> torch.Tensor:
    """A gate's values expanded to the rows of a segment (head-major)."""
    if kind == "head":
        return gate.repeat_interleave(width)
    if UNIT_KINDS[kind].per_head:
        return gate.reshape(-1)
    return gate


def indices(model: torch.nn.Module, name: str, s: Slice, kind: str, units: list) -> torch.Tensor:
    """Positions along the slice's axis of the given units (gate indices: ints or (head, dim))."""
    offset, _, width = segment(model, name, s)
    if kind == "head":
        rows = [h * width + d for h in units for d in range(width)]
    elif UNIT_KINDS[kind].per_head:
        rows = [h * width + d for h, d in units]
    else:
        rows = list(units)
    return torch.tensor(rows, dtype=torch.long) + offset


# --------------------------------------------------------------------- derived quantities
@torch.no_grad()
def squared_magnitudes(model: torch.nn.Module) -> dict:
    """Squared L2 norm of each gate element's producing slices, nested like the gates."""
    check_covered(model)

    def layer(kind: str, block: int | None) -> torch.Tensor:
        total = None
        for name, s in slices(model, kind, block):
            if s.role != "produce":
                continue
            t = model.get_parameter(name).detach().double().pow(2)
            t = t.movedim(s.axis, 0).reshape(t.shape[s.axis], -1).sum(1)
            offset, H, width = segment(model, name, s)
            t = t[offset:offset + H * width]
            if kind == "head":
                t = t.view(H, width).sum(1)
            elif UNIT_KINDS[kind].per_head:
                t = t.view(H, width)
            total = t if total is None else total + t
        return total

    return {"emb": layer("emb", None),
            "blocks": [{k: layer(k, i) for k in BLOCK_KINDS} for i in range(len(model.blocks))]}


def pruned_slices(model: torch.nn.Module, kind: str, block: int | None, units: list
                  ) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, axis, positions) of every weight that belongs to the given units."""
    check_covered(model)
    return [(model.get_parameter(name), s.axis, indices(model, name, s, kind, units))
            for name, s in slices(model, kind, block)]


@torch.no_grad()
def clear_pruned_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                       removed: list) -> None:
    """Zero every per-parameter optimizer tensor (momenta, second moments) at pruned units.

    A removed unit's weights get zero gradient, but Adam's running moments would keep moving
    them and keep their memory of the dense model; zeroed, they stand still as if gone.
    """
    for kind, block, units in removed:
        for param, axis, pos in pruned_slices(model, kind, block, units):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.index_fill_(axis, pos.to(value.device), 0)


def _touching(model: torch.nn.Module) -> dict:
    """parameter name -> axis -> segment -> [(kind, slice, block)]: every unit kind that owns
    positions along each axis of each covered parameter (segments in Q, K, V order)."""
    out: dict[str, dict[int, dict[str | None, list]]] = {}
    for kind in KINDS:
        for name, s in slices(model, kind, None):
            block = int(name.split(".")[1]) if kind != "emb" else None
            out.setdefault(name, {}).setdefault(s.axis, {}).setdefault(s.segment, []).append(
                (kind, s, block))
    return out


def _required(new_dims: Dims, name: str, kind: str, s: Slice) -> int:
    """Positions a segment has in the compact model."""
    if s.segment is None:
        width = getattr(new_dims, UNIT_KINDS[kind].width)
        return width if kind == "emb" else width[int(name.split(".")[1])]
    block = int(name.split(".")[1])
    width = new_dims.v_dim[block] if s.segment == "v" else new_dims.qk_dim[block]
    return new_dims.num_heads[block] * width


def _segment_selection(model: torch.nn.Module, name: str, entries: list, gate_of, need: int,
                       ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions kept, factor per kept position) in one segment of one axis: live where every
    owning kind's gate is non-zero, scaled by the gates that multiply the slice; a segment
    pruned to nothing keeps `need` zero placeholder positions."""
    offset, H, width = segment(model, name, entries[0][1])
    live = torch.ones(H * width, dtype=torch.bool, device=ref.device)
    factor = torch.ones(H * width, dtype=ref.dtype, device=ref.device)
    for kind, s, block in entries:
        g = gate_of(kind, block)
        if g is None:
            continue
        rows = _rows_of(kind, g.detach().to(device=ref.device, dtype=ref.dtype), width)
        live &= rows != 0
        if s.gated:
            factor = factor * rows
    keep = torch.nonzero(live).flatten()
    if keep.numel() == 0:  # a width pruned to 0
        return torch.full((need,), offset, device=ref.device), ref.new_zeros(need)
    if keep.numel() != need:
        raise ValueError(f"{name}: {keep.numel()} live positions but the compact dims need {need}")
    return keep + offset, factor[keep]


def compact_state(model: torch.nn.Module, gates: dict, new_dims: Dims) -> dict:
    """The compact model's state dict: live positions kept along every covered axis, the
    values of the gates that multiply a slice folded into it, and a width pruned to 0 kept as
    zero placeholder positions (as many as `new_dims` holds) on every slice it touches.

    gates: {"emb": tensor or None, "blocks": [{kind: tensor or None}] or None}.
    """
    check_covered(model)

    def gate_of(kind: str, block: int | None) -> torch.Tensor | None:
        if kind == "emb":
            return gates["emb"]
        return None if gates["blocks"] is None else gates["blocks"][block].get(kind)

    touching = _touching(model)
    out = {}
    for name, t in model.state_dict().items():
        for axis, segments in touching.get(name, {}).items():
            picks = [_segment_selection(model, name, entries, gate_of,
                                        _required(new_dims, name, entries[0][0], entries[0][1]), t)
                     for entries in segments.values()]
            shape = [1] * t.dim()
            shape[axis] = -1
            t = (t.index_select(axis, torch.cat([p[0] for p in picks]))
                 * torch.cat([p[1] for p in picks]).view(shape))
        out[name] = t
    return out
