"""The unit map: what each prunable unit kind consists of, written once per model family.

A unit kind (embedding channel, head, QK dim, V dim, MLP neuron) is a width of the model
(a dims field) and a set of parameter slices: which parameter, along which axis, in which
head-major segment of that axis (the Q, K or V rows of `attn.qkv`; the V columns of
`attn.proj`; "h": one position per head), whether a unit *produces* it (output rows: what
magnitude scores and what the gate's value is folded into), *consumes* it (input columns)
or merely *owns* it (a per-head bias table: removed with the head, neither scored nor
gated), and whether the kind's gate multiplies it in the forward pass (the models apply the
gates; this table says what they mean). Gate shapes, magnitude scores, compaction,
optimizer-state clean-up and the pruner's width bookkeeping are derived from it, and each
refuses a model parameter that the map neither covers nor lists in its family's `UNPRUNED`
(a new parameter cannot be skipped silently).

A *layer* is one gate tensor: the embedding of one residual stream (a ViT has one; a Swin
one per stage), one kind in one block, or a model-level kind (`MODEL_KINDS`: SigLIP's pool
MLP, one layer per model). Embedding slices are the blocks' of that stream
plus model-level ones: `where` "first" / "last" keeps a slice to the first or last stream
(the patch embedding; the final norm and classifier), and a name may hold `{s}` (this
stream's stage) or `{n}` (the next stage, where a Swin's patch merging reads the stream
as four concatenated copies: `repeats` 4). The timm ViT family's extra parameters are
entries like any other: LayerScale gammas are "emb" produce slices of a block, register
tokens and fc_norm model slices like `cls_token` and `norm`. A slice whose parameter a
model does not have (no qkv bias, no LayerScale, no class token) is simply absent from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from models.swin_dims import SwinDims


@dataclass(frozen=True)
class Slice:
    param: str  # model-level name ("pos_embed", "layers.{n}.downsample.reduction.weight") or,
    #             for block slices, the name in a block
    axis: int
    role: str  # "produce" (output rows of the unit), "consume" (input columns) or "own"
    segment: str | None = None  # "q", "k", "v": those head-major rows/columns; "h": per head;
    #                             "d": one position per QK dim, shared by the heads (qk-norm)
    gated: bool = False  # the kind's gate multiplies this slice's contribution
    repeats: int = 1  # the axis holds this many copies of the unit axis, one after another
    where: str | None = None  # model slices: "first" or "last" stream only; None: every one


@dataclass(frozen=True)
class UnitKind:
    name: str
    width: str  # the dims field this kind prunes
    per_head: bool  # gate (heads, width) rather than (width,)
    block_slices: tuple[Slice, ...]
    model_slices: tuple[Slice, ...] = ()


def _p(param: str, axis: int, segment: str | None = None, gated: bool = True, repeats: int = 1,
       where: str | None = None) -> Slice:
    return Slice(param, axis, "produce", segment, gated, repeats, where)


def _c(param: str, axis: int, segment: str | None = None, repeats: int = 1,
       where: str | None = None) -> Slice:
    return Slice(param, axis, "consume", segment, False, repeats, where)


def _own(param: str, axis: int) -> Slice:
    return Slice(param, axis, "own", "h")


# The parameters holding each head-major segment's rows: the fused `qkv` (and its bias),
# timm's Eva Q and V biases (no K bias), separate projections (qkv_fused false), and the
# norm over the attention output (V positions; statistics over the live ones)
_ROWS = {"q": ("attn.qkv.weight", "attn.qkv.bias", "attn.q_bias", "attn.q_proj.weight",
               "attn.q_proj.bias"),
         "k": ("attn.qkv.weight", "attn.qkv.bias", "attn.k_proj.weight", "attn.k_proj.bias"),
         "v": ("attn.qkv.weight", "attn.qkv.bias", "attn.v_bias", "attn.v_proj.weight",
               "attn.v_proj.bias",
               "attn.norm.weight", "attn.norm.bias")}  # scale_attn_inner: over V outputs
_READERS = ("attn.qkv.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
            "mlp.fc1.weight", "mlp.fc1_g.weight", "mlp.fc1_x.weight")  # input columns: emb


def _mlp_kind(fc1_copies: int = 1) -> UnitKind:
    """MLP neurons; a packed SwiGLU's fc1 holds each unit's gate row and value row (two
    copies of the unit axis), a split one's fc1_g and fc1_x a row each: removed together and
    both scaled by the unit's gate; an MLP norm's (scale_mlp) weight and bias at the unit too."""
    return UnitKind("mlp", "mlp_dim", False,
                    block_slices=(_p("mlp.fc1.weight", 0, repeats=fc1_copies),
                                  _p("mlp.fc1.bias", 0, repeats=fc1_copies),
                                  *(_p(f"mlp.{n}.{w}", 0) for n in ("fc1_g", "fc1_x", "norm")
                                    for w in ("weight", "bias")),
                                  _c("mlp.fc2.weight", 1)))


_MLP = _mlp_kind()
UNIT_KINDS: dict[str, UnitKind] = {k.name: k for k in (
    UnitKind("emb", "embed_dim", False,
             block_slices=(_p("norm1.weight", 0), _p("norm1.bias", 0),
                           _p("attn.proj.weight", 0), _p("attn.proj.bias", 0), _p("ls1.gamma", 0),
                           _p("norm2.weight", 0), _p("norm2.bias", 0),
                           _p("mlp.fc2.weight", 0), _p("mlp.fc2.bias", 0), _p("ls2.gamma", 0),
                           _p("gamma_1", 0), _p("gamma_2", 0),  # Eva's LayerScale names
                           *(_c(n, 1) for n in _READERS)),
             model_slices=(_p("patch_embed.proj.weight", 0), _p("patch_embed.proj.bias", 0),
                           _p("cls_token", 2), _p("dist_token", 2), _p("reg_token", 2),
                           _p("pos_embed", 2), _p("norm_pre.weight", 0), _p("norm_pre.bias", 0),
                           _p("norm.weight", 0), _p("norm.bias", 0),
                           _p("fc_norm.weight", 0), _p("fc_norm.bias", 0),
                           _c("head.weight", 1), _c("head_dist.weight", 1),
                           # SigLIP's attention pool: reads and writes the stream
                           _p("attn_pool.latent", 2), _c("attn_pool.q.weight", 1),
                           _c("attn_pool.kv.weight", 1), _p("attn_pool.proj.weight", 0),
                           _p("attn_pool.proj.bias", 0), _p("attn_pool.norm.weight", 0),
                           _p("attn_pool.norm.bias", 0), _c("attn_pool.mlp.fc1.weight", 1),
                           _p("attn_pool.mlp.fc2.weight", 0), _p("attn_pool.mlp.fc2.bias", 0))),
    # the head gate multiplies the head's q, k and v
    UnitKind("head", "num_heads", False,
             block_slices=tuple(_p(n, 0, s) for s in "qkv" for n in _ROWS[s])
             + (_c("attn.proj.weight", 1, "v"),)),
    # the QK gate multiplies q only; removing a QK dim removes its k row as well
    # qk-norm: the gate scales both norms' weight and bias too (statistics over live dims)
    # rotary: a unit is a rotary pair of dims (`qk_pair`), the gate the same on both
    UnitKind("qk", "qk_dim", True,
             block_slices=tuple(_p(n, 0, "q") for n in _ROWS["q"])
             + tuple(_p(n, 0, "k", gated=False) for n in _ROWS["k"])
             + tuple(_p(f"attn.{n}_norm.{w}", 0, "d") for n in "qk" for w in ("weight", "bias"))),
    UnitKind("v", "v_dim", True,
             block_slices=tuple(_p(n, 0, "v") for n in _ROWS["v"])
             + (_c("attn.proj.weight", 1, "v"),)),
    _MLP,
)}
BLOCK_KINDS = tuple(UNIT_KINDS)[1:]
# Kinds of a model-level layer (one gate tensor per model, present when the model has the
# part): SigLIP's attention pool's MLP neurons, its fc1 rows and fc2 columns.
UNIT_KINDS["pool_mlp"] = UnitKind(
    "pool_mlp", "pool_mlp_dim", False, block_slices=(),
    model_slices=(_p("attn_pool.mlp.fc1.weight", 0), _p("attn_pool.mlp.fc1.bias", 0),
                  _c("attn_pool.mlp.fc2.weight", 1)))
MODEL_KINDS = ("pool_mlp",)
SWIGLU_PACKED_KINDS = {**UNIT_KINDS, "mlp": _mlp_kind(2)}
KINDS = tuple(UNIT_KINDS)
# parameters no unit owns: classifier biases (class axis), per-token scales (token axis),
# the attention pool's q and kv biases (its attention width is not a unit of this version)
UNPRUNED = (re.compile(r"head(_dist)?\.bias"), re.compile(r"blocks\.\d+\.attn\.token_scale"),
            re.compile(r"attn_pool\.(q|kv)\.bias"))


def _swin_kinds(version: int) -> dict[str, UnitKind]:
    """A Swin's map. Per stage, the stream is produced by the patch embedding (stage 0) or
    the patch merging's reduction (and v2's norm after it), and read by the next stage's
    merging as four copies (v1's norm over them is gated by this stream). v1 keeps ViT's
    QK rule (the gate on q); v2's cosine attention normalises k over its dims too, so its QK
    gate scales k as well. Per-head tables are owned by the head: v1's relative position
    bias columns, v2's logit scale and position-bias MLP output rows."""
    v1 = version == 1
    merge_in = ((_p("layers.{n}.downsample.norm.weight", 0, repeats=4),
                 _p("layers.{n}.downsample.norm.bias", 0, repeats=4)) if v1 else ())
    merge_out = (() if v1 else (_p("layers.{s}.downsample.norm.weight", 0),
                                _p("layers.{s}.downsample.norm.bias", 0)))
    qkv = ("attn.qkv.weight", "attn.qkv.bias") if v1 else ("attn.qkv.weight",)
    q_rows = tuple(_p(n, 0, "q") for n in qkv) + (() if v1 else (_p("attn.q_bias", 0, "q"),))
    k_rows = tuple(_p(n, 0, "k", gated=not v1) for n in qkv)
    v_rows = tuple(_p(n, 0, "v") for n in qkv) + (() if v1 else (_p("attn.v_bias", 0, "v"),))
    owned = ((_own("attn.relative_position_bias_table", 1),) if v1 else
             (_own("attn.logit_scale", 0), _own("attn.cpb_mlp.2.weight", 0)))
    return {k.name: k for k in (
        UnitKind("emb", "embed_dim", False,
                 block_slices=(_p("norm1.weight", 0), _p("norm1.bias", 0),
                               _c("attn.qkv.weight", 1), _p("attn.proj.weight", 0),
                               _p("attn.proj.bias", 0), _p("norm2.weight", 0),
                               _p("norm2.bias", 0), _c("mlp.fc1.weight", 1),
                               _p("mlp.fc2.weight", 0), _p("mlp.fc2.bias", 0)),
                 model_slices=(_p("patch_embed.proj.weight", 0, where="first"),
                               _p("patch_embed.proj.bias", 0, where="first"),
                               _p("patch_embed.norm.weight", 0, where="first"),
                               _p("patch_embed.norm.bias", 0, where="first"),
                               _p("layers.{s}.downsample.reduction.weight", 0),
                               *merge_out, *merge_in,
                               _c("layers.{n}.downsample.reduction.weight", 1, repeats=4),
                               _p("norm.weight", 0, where="last"),
                               _p("norm.bias", 0, where="last"),
                               _c("head.fc.weight", 1, where="last"))),
        UnitKind("head", "num_heads", False,
                 block_slices=q_rows + k_rows + v_rows + (_c("attn.proj.weight", 1, "v"),)
                 + owned),
        UnitKind("qk", "qk_dim", True, block_slices=q_rows + k_rows),
        UnitKind("v", "v_dim", True, block_slices=v_rows + (_c("attn.proj.weight", 1, "v"),)),
        _MLP,
    )}


SWIN_KINDS = {1: _swin_kinds(1), 2: _swin_kinds(2)}
SWIN_UNPRUNED = (re.compile(r"head\.fc\.bias"),
                 re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.cpb_mlp\.0\.(weight|bias)"))


def qk_pair(dims) -> str | None:
    """How a QK unit pairs dims: None (a unit is one dim), or a rotary model's pair layout,
    "half" ((i, i + d/2)) or "interleaved" ((2i, 2i + 1)): both dims of a pair rotate into
    each other, so they are kept or removed together and the compact block keeps the pair's
    frequencies (Dims.rope_dims)."""
    if not getattr(dims, "rope_dim", None):
        return None
    return "half" if dims.family("rope_half") else "interleaved"


def unit_width(dims, kind: str) -> int:
    """Dims of its width one unit of this kind is: 2 for a rotary pair, else 1."""
    return 2 if kind == "qk" and qk_pair(dims) else 1


def pair_dims(unit: int, width: int, layout: str) -> tuple[int, int]:
    """The two dims of QK pair `unit` in a head of `width` dims."""
    return (unit, unit + width // 2) if layout == "half" else (2 * unit, 2 * unit + 1)


def per_pair(values: torch.Tensor, layout: str, combine) -> torch.Tensor:
    """Per-dim values along the last axis -> one per pair, `combine`d (add, or)."""
    if layout == "half":
        n = values.shape[-1] // 2
        return combine(values[..., :n], values[..., n:])
    return combine(values[..., 0::2], values[..., 1::2])


def model_kinds(dims) -> tuple[str, ...]:
    """The model-level kinds this model has (SigLIP's pool MLP with global_pool "map")."""
    if isinstance(dims, SwinDims) or dims.family("global_pool") != "map":
        return ()
    return MODEL_KINDS


def width_of(dims, kind: str, layer: int) -> int:
    """A layer's width in units' dims: a block list's entry, or a model-level scalar."""
    value = getattr(dims, UNIT_KINDS[kind].width)
    return value[layer] if isinstance(value, list) else value


def unit_kinds(model: torch.nn.Module) -> dict[str, UnitKind]:
    """The unit map of this model's family."""
    d = model.dims
    if isinstance(d, SwinDims):
        return SWIN_KINDS[d.version]
    return SWIGLU_PACKED_KINDS if d.family("mlp_act") == "swiglu_packed" else UNIT_KINDS


def _unpruned(model: torch.nn.Module) -> tuple:
    return SWIN_UNPRUNED if isinstance(model.dims, SwinDims) else UNPRUNED


def block_names(model: torch.nn.Module) -> list[str]:
    """Each block's module name, in block order."""
    d = model.dims
    if isinstance(d, SwinDims):
        return [f"layers.{s}.blocks.{j}" for s in range(d.num_stages) for j in range(d.depths[s])]
    return [f"blocks.{i}" for i in range(d.depth)]


def num_streams(dims) -> int:
    return len(dims.streams)


# ------------------------------------------------------------------------- the model side
def gate_shape(kind: str, dims, layer: int) -> tuple[int, ...]:
    """Shape of one gate tensor of this kind (layer: the stream for "emb", else the block)."""
    if kind == "emb":
        return (dims.streams[layer],)
    k = UNIT_KINDS[kind]
    width = width_of(dims, kind, layer)
    return (dims.num_heads[layer], width) if k.per_head else (width,)


def slices(model: torch.nn.Module, kind: str, layer: int | None):
    """(full parameter name, Slice, layer) of one layer (None: every layer of the kind); an
    embedding layer is a stream: its blocks' slices and its model-level ones."""
    k = unit_kinds(model)[kind]
    d = model.dims
    params = dict(model.named_parameters())
    names = block_names(model)
    out = []
    if kind == "emb":
        streams = range(num_streams(d)) if layer is None else [layer]
        last = num_streams(d) - 1
        for s in streams:
            for sl in k.model_slices:
                if (sl.where == "first" and s != 0) or (sl.where == "last" and s != last):
                    continue
                name = sl.param.format(s=s, n=s + 1)
                if name in params:
                    out.append((name, sl, s))
            blocks = [i for i in range(d.depth) if d.stream_of(i) == s]
            out += [(f"{names[i]}.{sl.param}", sl, s) for i in blocks for sl in k.block_slices
                    if f"{names[i]}.{sl.param}" in params]
        return out
    if kind in MODEL_KINDS:
        return [(sl.param, sl, 0) for sl in k.model_slices if sl.param in params]
    blocks = range(d.depth) if layer is None else [layer]
    return [(f"{names[i]}.{sl.param}", sl, i) for i in blocks for sl in k.block_slices
            if f"{names[i]}.{sl.param}" in params]


def segment(model: torch.nn.Module, name: str, s: Slice) -> tuple[int, int, int]:
    """(offset, heads, width per head) of a slice's segment of one copy of the unit axis;
    the whole axis (one copy of it): (0, 1, n)."""
    if s.segment is None:
        return 0, 1, model.get_parameter(name).shape[s.axis] // s.repeats
    attn = model.get_submodule(name.split(".attn.")[0] + ".attn")
    H, qk, v = attn.num_heads, attn.qk_dim, attn.v_dim
    if s.segment == "h":
        return 0, H, 1
    if s.segment == "d":
        return 0, 1, qk
    width = v if s.segment == "v" else qk
    offset = {"q": 0, "k": H * qk, "v": 2 * H * qk}[s.segment] if ".attn.qkv." in name else 0
    return offset, H, width


def check_covered(model: torch.nn.Module) -> None:
    """Raise if the model has a parameter the unit map does not account for."""
    covered = {name for kind in unit_kinds(model) for name, _, _ in slices(model, kind, None)}
    unpruned = _unpruned(model)
    for name, _ in model.named_parameters():
        if name not in covered and not any(p.fullmatch(name) for p in unpruned):
            raise ValueError(f"the unit map (pruning/units.py) does not cover parameter {name!r}: "
                             f"say which unit kinds own it, or list it as unpruned")


def shared_by_heads(gate: torch.Tensor) -> torch.Tensor:
    """A (heads, width) gate's one value per dim, for a parameter the heads share (qk-norm);
    only defined when every head has the same values (QK units shared by the heads)."""
    if not bool((gate == gate[:1]).all()):
        raise ValueError("a qk-norm weight is shared by the heads, so its block's QK units must "
                         "be too (QK/V units 'shared', not 'per_head')")
    return gate[0]


def _rows_of(kind: str, gate: torch.Tensor, width: int, seg: str | None = None) -> torch.Tensor:
    """A gate's values expanded to the rows of a segment (head-major)."""
    if seg == "d":
        return shared_by_heads(gate)
    if kind == "head":
        return gate.repeat_interleave(width)
    if UNIT_KINDS[kind].per_head:
        return gate.reshape(-1)
    return gate


def _tile(positions: torch.Tensor, s: Slice, copy: int) -> torch.Tensor:
    """Positions in one copy of the unit axis -> positions in every copy of it."""
    if s.repeats == 1:
        return positions
    return torch.cat([positions + j * copy for j in range(s.repeats)])


def indices(model: torch.nn.Module, name: str, s: Slice, kind: str, units: list) -> torch.Tensor:
    """Positions along the slice's axis of the given units (gate indices: ints or (head, dim))."""
    offset, H, width = segment(model, name, s)
    if kind == "head":
        rows = [h * width + d for h in units for d in range(width)]
    elif s.segment == "d":
        rows = sorted({d for _, d in units})
    elif UNIT_KINDS[kind].per_head:
        rows = [h * width + d for h, d in units]
    else:
        rows = list(units)
    return _tile(torch.tensor(rows, dtype=torch.long) + offset, s, H * width)


# --------------------------------------------------------------------- derived quantities
def nest_layers(model: torch.nn.Module, layer) -> dict:
    """{"emb": [layer("emb", s) per stream], "blocks": [{kind: layer(kind, i)}],
    "model": {kind: layer(kind, 0)}}."""
    d = model.dims
    return {"emb": [layer("emb", s) for s in range(num_streams(d))],
            "blocks": [{k: layer(k, i) for k in BLOCK_KINDS} for i in range(d.depth)],
            "model": {k: layer(k, 0) for k in model_kinds(d)}}


@torch.no_grad()
def squared_magnitudes(model: torch.nn.Module) -> dict:
    """Squared L2 norm of each gate element's producing slices, nested like the gates."""
    check_covered(model)

    def layer(kind: str, index: int) -> torch.Tensor:
        total = None
        for name, s, _ in slices(model, kind, index):
            if s.role != "produce":
                continue
            t = model.get_parameter(name).detach().double().pow(2)
            t = t.movedim(s.axis, 0).reshape(t.shape[s.axis], -1).sum(1)
            t = t.view(s.repeats, -1).sum(0)
            offset, H, width = segment(model, name, s)
            t = t[offset:offset + H * width]
            if kind == "head":
                t = t.view(H, width).sum(1)
            elif UNIT_KINDS[kind].per_head:
                t = t.view(H, width)
            total = t if total is None else total + t
        return total

    return nest_layers(model, layer)


def pruned_slices(model: torch.nn.Module, kind: str, layer: int, units: list
                  ) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, axis, positions) of every weight that belongs to the given units."""
    check_covered(model)
    return [(model.get_parameter(name), s.axis, indices(model, name, s, kind, units))
            for name, s, _ in slices(model, kind, layer)]


@torch.no_grad()
def clear_pruned_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                       removed: list) -> None:
    """Zero every per-parameter optimizer tensor (momenta, second moments) at pruned units.

    A removed unit's weights get zero gradient, but Adam's running moments would keep moving
    them and keep their memory of the dense model; zeroed, they stand still as if gone.
    """
    for kind, layer, units in removed:
        for param, axis, pos in pruned_slices(model, kind, layer, units):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.index_fill_(axis, pos.to(value.device), 0)


def _touching(model: torch.nn.Module) -> dict:
    """parameter name -> axis -> segment -> [(kind, slice, layer)]: every unit kind that owns
    positions along each axis of each covered parameter (segments in Q, K, V order)."""
    out: dict[str, dict[int, dict[str | None, list]]] = {}
    for kind in unit_kinds(model):
        for name, s, layer in slices(model, kind, None):
            out.setdefault(name, {}).setdefault(s.axis, {}).setdefault(s.segment, []).append(
                (kind, s, layer))
    return out


def _required(new_dims, kind: str, s: Slice, layer: int) -> int:
    """Positions a slice's segment has in the compact model (all copies)."""
    if kind == "emb":
        return new_dims.streams[layer] * s.repeats
    if s.segment is None:
        return width_of(new_dims, kind, layer) * s.repeats
    heads = new_dims.num_heads[layer]
    if s.segment == "h":
        return heads
    if s.segment == "d":
        return new_dims.qk_dim[layer]
    return heads * (new_dims.v_dim[layer] if s.segment == "v" else new_dims.qk_dim[layer])


def _segment_selection(model: torch.nn.Module, name: str, entries: list, gate_of, need: int,
                       ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions kept, factor per kept position) in one segment of one axis: live where every
    owning kind's gate is non-zero, scaled by the gates that multiply the slice; a segment
    pruned to nothing keeps `need` zero placeholder positions."""
    first = entries[0][1]
    offset, H, width = segment(model, name, first)
    live = torch.ones(H * width, dtype=torch.bool, device=ref.device)
    factor = torch.ones(H * width, dtype=ref.dtype, device=ref.device)
    for kind, s, layer in entries:
        g = gate_of(kind, layer)
        if g is None:
            continue
        rows = _rows_of(kind, g.detach().to(device=ref.device, dtype=ref.dtype), width, s.segment)
        live &= rows != 0
        if s.gated:
            factor = factor * rows
    keep = _tile(torch.nonzero(live).flatten(), first, H * width)
    factor = factor.repeat(first.repeats)
    if keep.numel() == 0:  # a width pruned to 0
        return torch.full((need,), offset, device=ref.device), ref.new_zeros(need)
    if keep.numel() != need:
        raise ValueError(f"{name}: {keep.numel()} live positions but the compact dims need {need}")
    return keep + offset, factor[keep]


def compact_state(model: torch.nn.Module, gates: dict, new_dims) -> dict:
    """The compact model's state dict: live positions kept along every covered axis, the
    values of the gates that multiply a slice folded into it, and a width pruned to 0 kept as
    zero placeholder positions (as many as `new_dims` holds) on every slice it touches.

    gates: {"emb": [tensor or None per stream] or None, "blocks": [{kind: tensor or None}]
    or None, "model": {kind: tensor} (optional)}.
    """
    check_covered(model)

    def gate_of(kind: str, layer: int) -> torch.Tensor | None:
        if kind == "emb":
            return None if gates["emb"] is None else gates["emb"][layer]
        if kind in MODEL_KINDS:
            return (gates.get("model") or {}).get(kind)
        return None if gates["blocks"] is None else gates["blocks"][layer].get(kind)

    touching = _touching(model)
    out = {}
    for name, t in model.state_dict().items():
        for axis, segments in touching.get(name, {}).items():
            picks = [_segment_selection(model, name, entries, gate_of,
                                        _required(new_dims, entries[0][0], entries[0][1],
                                                  entries[0][2]), t)
                     for entries in segments.values()]
            shape = [1] * t.dim()
            shape[axis] = -1
            t = (t.index_select(axis, torch.cat([p[0] for p in picks]))
                 * torch.cat([p[1] for p in picks]).view(shape))
        out[name] = t
    return out
