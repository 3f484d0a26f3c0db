"""Exact MACs and parameters of a Swin (ReSwin) from its dims; the cost models' Swin half.

A Swin block's cost depends on its stage: the stage's token grid, and its window, within
which attention runs (on the grid padded to whole windows, as timm pads it). `block_at(i,
...)` prices block i at its stage; `total(dims)` adds the stem (patch embedding, the patch
mergings between stages, the classifier), which depends on the stages' widths. The latency
table of a Swin is timed per stage, at the stage's tokens and window (`SwinLatencyTable`).
"""
from __future__ import annotations

from errors import UserError
from models.swin_dims import CPB_HIDDEN, SwinDims

from .cost import (_UNITS_TO_MS, ATTENTION_AXES, MLP_AXES, STEM_AXES, TABLE_SOURCE, CostModel,
                   LatencyTable, _Grid, _need_frame, _read_grid)


class _SwinCost(CostModel):
    def __init__(self, dims: SwinDims) -> None:
        _need_frame(dims, type(self).__name__)
        self.dims = dims

    def block(self, *widths) -> float:
        raise ValueError("a Swin block's cost depends on its stage: use block_at")

    def total(self, dims: SwinDims) -> float:
        E = dims.embed_dim
        return self.stem_total(dims) + sum(
            self.block_at(i, E[dims.stream_of(i)], dims.num_heads[i], dims.qk_dim[i],
                          dims.v_dim[i], dims.mlp_dim[i]) for i in range(dims.depth))

    def stem(self, dims: SwinDims, embed_dim: int) -> float:
        return self.stem_total(dims)


class SwinMacsCost(_SwinCost):
    """Multiply-accumulates per image of a batch-1 eval forward, exactly what torch's
    `FlopCounterMode` counts, halved: the q/k/v and output projections over the stage's grid
    padded to whole windows, q.k and attn.v within each window, the MLP over the grid, v2's
    position-bias MLP (once per forward, over the (2w-1)^2 relative positions), the patch
    embedding, the patch mergings' reductions and the classifier. Norms, softmax, masks,
    GELU and pooling are not counted by the flop counter and not here."""

    name = "macs"

    def block_at(self, index: int, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
                 mlp_dim: int) -> float:
        d = self.dims
        s = d.stream_of(index)
        w, _ = d.window(s)
        tokens, padded = d.grid(s) ** 2, d.padded_grid(s) ** 2
        E, qk, v = embed_dim, num_heads * qk_dim, num_heads * v_dim
        attention = padded * (E * (2 * qk + v) + w * w * (qk + v) + v * E)
        mlp = 2 * tokens * E * mlp_dim
        cpb = (2 * w - 1) ** 2 * CPB_HIDDEN * (2 + num_heads) if d.version == 2 else 0
        return float(attention + mlp + cpb)

    def stem_total(self, dims: SwinDims) -> float:
        E = dims.embed_dim
        patch = dims.grid(0) ** 2 * E[0] * dims.in_chans * dims.patch_size ** 2
        merges = sum(dims.grid(s) ** 2 * 4 * E[s - 1] * E[s] for s in range(1, dims.num_stages))
        return float(patch + merges + E[-1] * dims.num_classes)


class SwinParamsCost(_SwinCost):
    """Exact parameter count: equals `sum(p.numel() for p in ReSwin(dims).parameters())`."""

    name = "params"

    def block_at(self, index: int, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
                 mlp_dim: int) -> float:
        d = self.dims
        w, _ = d.window(d.stream_of(index))
        E, H, qk, v, M = embed_dim, num_heads, num_heads * qk_dim, num_heads * v_dim, mlp_dim
        if d.version == 1:
            per_head = (2 * w - 1) ** 2 * H + d.qkv_bias * (2 * qk + v)  # bias table, qkv bias
        else:  # logit scale, position-bias MLP, q and v biases
            per_head = H + (2 * CPB_HIDDEN + CPB_HIDDEN) + CPB_HIDDEN * H + d.qkv_bias * (qk + v)
        attention = E * (2 * qk + v) + v * E + E + per_head
        mlp = E * M + M + M * E + E
        return float(4 * E + attention + mlp)

    def stem_total(self, dims: SwinDims) -> float:
        E = dims.embed_dim
        patch = E[0] * dims.in_chans * dims.patch_size ** 2 + E[0] + 2 * E[0]
        merges = 0
        for s in range(1, dims.num_stages):
            norm = 2 * 4 * E[s - 1] if dims.version == 1 else 2 * E[s]
            merges += 4 * E[s - 1] * E[s] + norm
        head = E[-1] * dims.num_classes + dims.num_classes
        return float(patch + merges + 2 * E[-1] + head)


# ------------------------------------------------------------------------- latency
SWIN_TABLE_FORMAT = "nvit-swin-latency-table"
SWIN_PARTS = ("attention", "attention_shifted", "mlp")
STEM_PARTS = ("patch_embed", "merges", "head")
MERGE_AXES = ("in_dim", "embed_dim")


def stage_frames(dims: SwinDims) -> list[dict]:
    """What a Swin table records per stage and must match: the token grid, the window and
    the shift (0: no block of the stage shifts)."""
    return [{"grid": dims.grid(s), "window": dims.window(s)[0], "shift": dims.window(s)[1]}
            for s in range(dims.num_stages)]


class SwinLatencyTable(LatencyTable):
    """Latency of a Swin in milliseconds, timed per stage at the stage's own tokens and window.

    JSON (written by tools/build_latency_table.py for a Swin, made by `make_dict`)::

        {"format": "nvit-swin-latency-table", "version": 1, "unit": "ms",
         "meta": {..., "version": 1 or 2,
                  "stages": [{"grid": 56, "window": 7, "shift": 3}, ...]},
         "stages": [{"attention": GRID, "attention_shifted": GRID, "mlp": GRID}, ...],
         "patch_embed": {"axes": {"embed_dim": [...]}, "latency": [...]},   # these three:
         "merges": [{"axes": {"in_dim": [...], "embed_dim": [...]}, ...}],    # optional,
         "head": {"axes": {"embed_dim": [...]}, "latency": [...]}}            # together

    Each stage's GRIDs are LatencyTable's attention and MLP grids; "attention_shifted" (the
    odd blocks' attention, with the roll and the shift mask) is there when the stage shifts.
    A block costs its stage's attention (shifted or not) + MLP; the stem is the patch
    embedding at stage 0's width, one merging per later stage at (previous, own) width and
    the head (final norm, pooling, classifier) at the last stage's width. Grids are read as
    LatencyTable reads them (monotone, clamped below, proportional above).
    """

    def __init__(self, stages: list[dict[str, _Grid]], stem: dict | None, meta: dict) -> None:
        super().__init__({}, None, meta, "nvit")
        self.stages, self.stem_parts = stages, stem
        self.frames = meta.get("stages") or []
        self.dims: SwinDims | None = None  # the model priced, once bound

    @property
    def num_tokens(self) -> int | None:
        return None

    def block(self, *widths) -> float:
        raise ValueError("a Swin block's latency depends on its stage: use block_at")

    def _stage_index(self, dims: SwinDims | None, index: int) -> tuple[int, bool]:
        if dims is None:
            raise ValueError("bind the table to the model's dims first (SwinLatencyTable.bind)")
        s = dims.stream_of(index)
        return s, bool((index - dims.stage_blocks(s).start) % 2) and dims.window(s)[1] > 0

    def block_at(self, index: int, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
                 mlp_dim: int) -> float:
        s, shifted = self._stage_index(self.dims, index)
        parts = self.stages[s]
        attention = parts["attention_shifted" if shifted else "attention"]
        return (attention(embed_dim, num_heads, qk_dim, v_dim) + parts["mlp"](embed_dim, mlp_dim))

    def bind(self, dims: SwinDims) -> "SwinLatencyTable":
        """Attach the model the table prices (its stages and which blocks shift)."""
        self.dims = dims
        return self

    def total(self, dims: SwinDims) -> float:
        E = dims.embed_dim
        return self.stem(dims, E) + sum(
            self.block_at(i, E[dims.stream_of(i)], dims.num_heads[i], dims.qk_dim[i],
                          dims.v_dim[i], dims.mlp_dim[i]) for i in range(dims.depth))

    def stem(self, dims: SwinDims, embed_dim=None) -> float:
        if self.stem_parts is None:
            return 0.0
        E = dims.embed_dim
        return (self.stem_parts["patch_embed"](E[0]) + self.stem_parts["head"](E[-1])
                + sum(m(E[s], E[s + 1]) for s, m in enumerate(self.stem_parts["merges"])))

    def frame_note(self, dims) -> str | None:
        if not isinstance(dims, SwinDims):
            return "the latency table was timed for a Swin's stages, this model is a ViT"
        version = self.meta.get("version")
        if version is not None and version != dims.version:
            return f"the latency table was timed for a Swin v{version}, this model is a v{dims.version}"
        if self.frames != stage_frames(dims):
            return (f"the latency table was timed for stages {_frames_text(self.frames)} but "
                    f"the model has {_frames_text(stage_frames(dims))}")
        return None

    def coverage_note(self, dims: SwinDims) -> str | None:
        for s, parts in enumerate(self.stages):
            blocks = dims.stage_blocks(s)
            widest = {"embed_dim": dims.embed_dim[s],
                      **{n: max(getattr(dims, n)[i] for i in blocks)
                         for n in ("num_heads", "qk_dim", "v_dim", "mlp_dim")}}
            for part, grid in parts.items():
                for axis, pts in zip(grid.axes, grid.points):
                    if len(pts) > 1 and widest[axis] <= pts[0]:
                        return (f"its stage {s} {part} grid starts at {axis} {pts[0]:g}, above "
                                f"the stage's widest {axis} {widest[axis]}, so pruning {axis} "
                                f"there changes no latency")
        return None

    @property
    def lowered(self) -> int:
        return sum(g.lowered for parts in self.stages for g in parts.values())

    # ------------------------------------------------------------- building
    @staticmethod
    def make_dict(meta: dict, stages: list[dict], stem: dict | None = None,
                  unit: str = "ms") -> dict:
        """The JSON content: `stages[s]` maps each part to (axes dict, nested latencies);
        `stem` maps patch_embed and head to (axes, latencies) and merges to a list of them."""
        def grid(axes_values):
            axes, values = axes_values
            return {"axes": {a: list(p) for a, p in axes.items()}, "latency": values}
        data = {"format": SWIN_TABLE_FORMAT, "version": 1, "unit": unit, "meta": dict(meta),
                "stages": [{k: grid(v) for k, v in st.items()} for st in stages]}
        if stem is not None:
            data["patch_embed"], data["head"] = grid(stem["patch_embed"]), grid(stem["head"])
            data["merges"] = [grid(m) for m in stem["merges"]]
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = TABLE_SOURCE) -> "SwinLatencyTable":
        if not isinstance(data, dict) or data.get("format") != SWIN_TABLE_FORMAT:
            raise UserError(f"{source}: not a Swin latency table (format {SWIN_TABLE_FORMAT!r})")
        if data.get("version", 1) != 1:
            raise UserError(f"{source}: table version {data.get('version')!r} is not supported "
                            f"(expected 1)")
        unit = data.get("unit", "ms")
        if unit not in _UNITS_TO_MS:
            raise UserError(f"{source}: unit {unit!r} is not one of {sorted(_UNITS_TO_MS)}")
        scale = _UNITS_TO_MS[unit]
        unknown = set(data) - {"format", "version", "unit", "meta", "stages", *STEM_PARTS}
        if unknown:
            raise UserError(f"{source}: unknown key(s) {sorted(unknown)}")
        meta = data.get("meta", {})
        stages_in = data.get("stages")
        if not isinstance(meta, dict) or not isinstance(stages_in, list) or not stages_in:
            raise UserError(f"{source}: a Swin table needs a 'meta' object and a non-empty "
                            f"'stages' list")
        frames = meta.get("stages")
        if not isinstance(frames, list) or len(frames) != len(stages_in):
            raise UserError(f"{source}: meta.stages must describe each of the "
                            f"{len(stages_in)} stages")
        axes = {"attention": ATTENTION_AXES, "attention_shifted": ATTENTION_AXES, "mlp": MLP_AXES}
        stages = []
        for s, node in enumerate(stages_in):
            shifts = isinstance(frames[s], dict) and bool(frames[s].get("shift"))
            need = SWIN_PARTS if shifts else ("attention", "mlp")
            if not isinstance(node, dict) or set(node) != set(need):
                got = sorted(node) if isinstance(node, dict) else type(node).__name__
                raise UserError(f"{source}: stage {s} must hold exactly {list(need)}, got {got}")
            stages.append({p: _read_grid(node[p], f"stages[{s}].{p}", axes[p], scale, source)
                           for p in need})
        stem = None
        present = [p for p in STEM_PARTS if p in data]
        if present:
            if len(present) != len(STEM_PARTS):
                raise UserError(f"{source}: {sorted(STEM_PARTS)} come together; found {present}")
            merges = data["merges"]
            if not isinstance(merges, list) or len(merges) != len(stages) - 1:
                raise UserError(f"{source}: 'merges' must list one grid per stage after the first")
            stem = {"patch_embed": _read_grid(data["patch_embed"], "patch_embed", STEM_AXES,
                                              scale, source),
                    "head": _read_grid(data["head"], "head", STEM_AXES, scale, source),
                    "merges": [_read_grid(m, f"merges[{i}]", MERGE_AXES, scale, source)
                               for i, m in enumerate(merges)]}
        return cls(stages, stem, dict(meta))


def is_swin_table(data) -> bool:
    return isinstance(data, dict) and data.get("format") == SWIN_TABLE_FORMAT


def _frames_text(frames: list[dict]) -> str:
    return ", ".join(f"{f.get('grid')}x{f.get('grid')} tokens in windows of {f.get('window')}"
                     for f in frames) or "(none recorded)"
