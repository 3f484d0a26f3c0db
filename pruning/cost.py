"""Cost models: the whole model's cost (MACs, parameters or latency) as a function of its dims.

The pruner asks two questions: what a block of given widths costs (`block`) and what the
whole model costs (`total`). It compares costs before and after removing units, so every
model here is deterministic and non-decreasing in each width.

- `MacsCost`: multiply-accumulates per image, exactly `FlopCounterMode` flops / 2.
- `ParamsCost`: exact parameter count of the built `ReViT`.
- `LatencyTable`: milliseconds, interpolated in a table measured on the user's device
  (written by tools/build_latency_table.py, or the NViT reference repository's table).
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import numpy as np

from errors import UserError
from models.dims import BLOCK_LISTS, Dims

KINDS = ("macs", "params", "latency")
TABLE_SOURCE = "latency table"
TABLE_FORMAT = "nvit-latency-table"
ATTENTION_AXES = ("embed_dim", "num_heads", "qk_dim", "v_dim")
MLP_AXES = ("embed_dim", "mlp_dim")
STEM_AXES = ("embed_dim",)
_UNITS_TO_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3}


class CostModel:
    """Cost of a ReViT from its widths: `total(dims)` = stem + sum of blocks."""

    name: str = ""

    def block(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
              mlp_dim: int) -> float:
        raise NotImplementedError

    def stem(self, dims: Dims, embed_dim: int) -> float:
        """Everything outside the blocks (patch embedding, tokens, final norm, heads)."""
        raise NotImplementedError

    def block_at(self, index: int, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
                 mlp_dim: int) -> float:
        """Block `index` at these widths (a ViT's blocks all see the same tokens; a
        hierarchical model's cost depends on the block's stage)."""
        return self.block(embed_dim, num_heads, qk_dim, v_dim, mlp_dim)

    def frame_note(self, dims: Dims) -> str | None:
        """A warning for the caller when the cost was measured for another frame (None: fine)."""
        return None

    def coverage_note(self, dims: Dims) -> str | None:
        """Why pruning `dims` cannot lower this cost on some axis (None: it can)."""
        return None

    def settings_note(self, device_type: str, precision: str, device_name: str | None = None
                      ) -> str | None:
        """A warning when the cost was measured on another kind of device, GPU model or
        precision than the run's (None: same, or not a measured cost)."""
        return None

    def total(self, dims: Dims) -> float:
        E = dims.embed_dim
        return self.stem(dims, E) + sum(
            self.block(E, *(getattr(dims, n)[i] for n in BLOCK_LISTS)) for i in range(dims.depth))


def fc1_rows(dims: Dims) -> int:
    """First-layer rows per MLP unit: 2 for a SwiGLU (gate and value), else 1."""
    return 2 if dims.family("mlp_act") in ("swiglu_packed", "swiglu") else 1


def _need_frame(dims: Dims, what: str) -> None:
    if not dims.complete:
        raise ValueError(f"{what} needs dims with the frame filled (use Dims.with_frame)")


class MacsCost(CostModel):
    """Multiply-accumulates per image of a batch-1 eval forward pass.

    Counts what `torch.utils.flop_counter.FlopCounterMode` counts, halved: the matrix
    products of the linear layers (biases are not counted), the patch-embedding
    convolution, and attention's Q.K^T and attn.V (SDPA's CPU math path is counted as two
    bmm; the fused kernels are registered with the same formula). LayerNorm, softmax,
    GELU, residual adds, LayerScale, average pooling and the mean of the two heads are not
    counted by flop_counter and not here. Every token (class, distillation, registers,
    patches) passes every block; one pooled vector (two for a distilled model) reaches the
    heads.
    """

    name = "macs"

    def __init__(self, dims: Dims) -> None:
        _need_frame(dims, "MacsCost")
        self.num_tokens = dims.num_tokens
        self.fc1_rows = fc1_rows(dims)

    def block(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
              mlp_dim: int) -> float:
        N, E, H = self.num_tokens, embed_dim, num_heads
        qk, v = H * qk_dim, H * v_dim
        linear = N * E * (2 * qk + v) + N * v * E + (self.fc1_rows + 1) * N * E * mlp_dim
        attention = N * N * (qk + v)
        return float(linear + attention)

    def stem(self, dims: Dims, embed_dim: int) -> float:
        _need_frame(dims, "MacsCost")
        patch = dims.num_patches * embed_dim * dims.in_chans * dims.patch_size ** 2
        heads = dims.num_classifier_heads * embed_dim * dims.num_classes
        return float(patch + heads + self.attn_pool(dims, embed_dim))

    @staticmethod
    def attn_pool(dims: Dims, E: int) -> int:
        """SigLIP's pool: q of the latent, kv of every patch, one query's attention, the
        output projection and the MLP of one vector."""
        if dims.global_pool != "map":
            return 0
        P, Np = dims.pool_dim, dims.num_patches
        return E * P + Np * E * 2 * P + 2 * Np * P + P * E + 2 * E * dims.pool_mlp_dim


class ParamsCost(CostModel):
    """Exact parameter count: equals `sum(p.numel() for p in ReViT(dims).parameters())`."""

    name = "params"

    def __init__(self, dims: Dims) -> None:
        _need_frame(dims, "ParamsCost")
        self.qkv_bias = dims.family("qkv_bias")
        self.k_bias = dims.family("k_bias")  # Eva's attention: Q and V biases only
        self.layer_scale = bool(dims.family("layer_scale"))
        self.qk_norm = bool(dims.family("qk_norm"))
        self.fc1_rows = fc1_rows(dims)
        self.mlp_norm = bool(dims.family("mlp_norm"))  # a LayerNorm over the hidden units
        self.attn_norm = bool(dims.family("attn_norm"))  # a LayerNorm over the V outputs
        self.token_scales = dims.num_tokens if dims.token_scale else 0  # one per token, unpruned

    def block(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
              mlp_dim: int) -> float:
        E, qk, v, M = embed_dim, num_heads * qk_dim, num_heads * v_dim, mlp_dim
        norms = 2 * 2 * E
        biases = self.qkv_bias * (qk * (1 + self.k_bias) + v)
        attention = E * (2 * qk + v) + biases + (v * E + E) + 2 * v * self.attn_norm
        mlp = self.fc1_rows * (E * M + M) + (M * E + E) + 2 * M * self.mlp_norm
        gammas = 2 * E * self.layer_scale
        qk_norms = 2 * 2 * qk_dim * self.qk_norm  # q_norm and k_norm, shared by the heads
        return float(norms + attention + mlp + gammas + qk_norms + self.token_scales)

    def stem(self, dims: Dims, embed_dim: int) -> float:
        _need_frame(dims, "ParamsCost")
        E, pre_norm = embed_dim, dims.family("pre_norm")
        patch = E * dims.in_chans * dims.patch_size ** 2 + (0 if pre_norm else E)  # bias
        positions = dims.pos_embed_tokens if dims.family("abs_pos_embed") else 0  # RoPE: none
        tokens = (dims.num_prefix_tokens + positions) * E  # tokens, pos_embed
        norm = 2 * E * (2 if pre_norm else 1)  # the final norm or fc_norm, CLIP's norm_pre
        heads = dims.num_classifier_heads * (E * dims.num_classes + dims.num_classes)
        return float(patch + tokens + norm + heads + self.attn_pool(dims, E))

    @staticmethod
    def attn_pool(dims: Dims, E: int) -> int:
        """SigLIP's pool: latent, q, kv, proj, its norm and MLP."""
        if dims.global_pool != "map":
            return 0
        P, M = dims.pool_dim, dims.pool_mlp_dim
        return E + (E * P + P) + (E * 2 * P + 2 * P) + (P * E + E) + 2 * E + (E * M + M) + (M * E + E)


# ------------------------------------------------------------------------- latency
FP32 = "float32"


def precision_name(amp_dtype) -> str:
    """How a latency table records, and a run compares, the precision it computes in:
    "float32", or "autocast float16" / "autocast bfloat16" for a torch dtype."""
    return FP32 if amp_dtype is None else f"autocast {str(amp_dtype).replace('torch.', '')}"


class _Grid:
    """A table on a rectilinear grid, read by multilinear interpolation.

    With `monotone` (our own tables), made non-decreasing along every axis at construction,
    because timing noise must not make removing a unit look like a slowdown (and a narrower
    attention shape can run as the wider one it is zero-padded to, models.revit.sdpa_widths,
    so a slower narrow point is not a property of the shape): a running minimum from the
    large end of each axis in turn gives the largest monotone table below the measured one.
    Timing noise is mostly upward (other load), and this way a slow outlier changes only its
    own point, where a running maximum would lift every wider point. `lowered` counts the
    points changed. Multilinear interpolation of a monotone grid is monotone. Outside the
    grid: below the smallest point of an axis the value is held (clamped); above the largest
    it grows in proportion to the width (value at the edge * x / x_max), a linear
    extrapolation through zero, which keeps the result monotone and non-negative even when
    several axes are beyond the grid.
    """

    def __init__(self, axes: Sequence[str], points: Sequence[Sequence[float]],
                 values: np.ndarray, monotone: bool = True) -> None:
        self.axes = tuple(axes)
        self.points = [np.asarray(p, dtype=float) for p in points]
        measured = np.asarray(values, dtype=float)
        values = measured
        for d in range(values.ndim if monotone else 0):
            flipped = np.flip(values, axis=d)
            values = np.flip(np.minimum.accumulate(flipped, axis=d), axis=d)
        self.values = values
        self.lowered = int((values < measured).sum())

    def __call__(self, *x: float) -> float:
        brackets = []
        factor = 1.0
        for pts, xi in zip(self.points, x):
            n = len(pts)
            if xi <= pts[0] or n == 1:
                brackets.append(((0, 1.0),))
                if n == 1 and xi > pts[0] > 0:
                    factor *= xi / pts[0]
            elif xi >= pts[-1]:
                brackets.append(((n - 1, 1.0),))
                factor *= xi / pts[-1]
            else:
                i = int(np.searchsorted(pts, xi, side="right")) - 1
                w = (xi - pts[i]) / (pts[i + 1] - pts[i])
                brackets.append(((i, 1.0 - w), (i + 1, w)))
        total = 0.0
        for corner in itertools.product(*brackets):
            weight = math.prod(w for _, w in corner)
            if weight:
                total += weight * float(self.values[tuple(i for i, _ in corner)])
        return max(total, 0.0) * factor


class LatencyTable(CostModel):
    """Latency in milliseconds, interpolated in a table measured on the user's device.

    Built with `LatencyTable.from_dict(json_content)`, which reads two formats.

    nvit format (written by tools/build_latency_table.py, made by `LatencyTable.make_dict`)::

        {"format": "nvit-latency-table", "version": 1, "unit": "ms",
         "meta": {"device": ..., "batch_size": 1, "num_tokens": 198, "torch": ...,
                  "dtype": "float32", "date": ..., ...},          # informative only
         "attention": {"axes": {"embed_dim": [E...], "num_heads": [H...],
                                "qk_dim": [q...], "v_dim": [v...]},  # per-head widths
                       "latency": nested list [E][H][q][v]},
         "mlp": {"axes": {"embed_dim": [E...], "mlp_dim": [M...]},
                 "latency": nested list [E][M]},
         "stem": {"axes": {"embed_dim": [E...]}, "latency": [E]}}  # optional

    Axis values are positive and increasing; the nesting follows the axis order above
    whatever the order of keys in "axes". "unit" may be "ms" (default), "s" or "us"; values
    are converted to ms. A block costs attention + mlp (each part as timed: LayerNorm, the
    sublayer and its residual add); without "stem" the stem costs 0.

    Reference format (the NViT repository's nvit/latency_head.json, read by
    nvit/pruning_core/pruning_engine_general.py)::

        {"EMB_768": {"QK_12_64": {"V_64": {"MLP_3072": 0.0808, ...}, ...}, ...}, ...}

    i.e. EMB_{embed} -> QK_{heads}_{qk per head} -> V_{v per head} -> MLP_{mlp} -> the
    latency of one whole block, on a full 5-D grid. Its values are seconds (for a large
    batch: 0.08 for a DeiT-B block) and are converted to ms. It is read as the reference
    reads it: values as measured (no monotone correction), an all-zero slice at embed 0
    below the smallest EMB, and the MLP_1 measurement placed at MLP width 0.

    Interpolation is multilinear; see `_Grid` for monotonicity and the extrapolation rule.
    """

    name = "latency"
    unit = "ms"

    def __init__(self, parts: dict[str, _Grid], stem: _Grid | None, meta: dict,
                 source_format: str) -> None:
        self.parts = parts  # {"attention", "mlp"} or {"block"}
        self.stem_grid = stem
        self.meta = meta
        self.source_format = source_format
        self._memo: dict[tuple, float] = {}

    # --------------------------------------------------------------- queries
    def attention(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int) -> float:
        if "attention" not in self.parts:
            raise ValueError("this table (reference format) has whole-block latencies only")
        return self.parts["attention"](embed_dim, num_heads, qk_dim, v_dim)

    def mlp(self, embed_dim: int, mlp_dim: int) -> float:
        if "mlp" not in self.parts:
            raise ValueError("this table (reference format) has whole-block latencies only")
        return self.parts["mlp"](embed_dim, mlp_dim)

    def block(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int,
              mlp_dim: int) -> float:
        key = (embed_dim, num_heads, qk_dim, v_dim, mlp_dim)
        hit = self._memo.get(key)
        if hit is None:
            if "block" in self.parts:
                hit = self.parts["block"](*key)
            else:
                hit = self.attention(*key[:4]) + self.mlp(embed_dim, mlp_dim)
            if len(self._memo) < 1_000_000:
                self._memo[key] = hit
        return hit

    def stem(self, dims: Dims, embed_dim: int) -> float:
        return self.stem_grid(embed_dim) if self.stem_grid is not None else 0.0

    @property
    def num_tokens(self) -> int | None:
        n = self.meta.get("num_tokens")
        return n if isinstance(n, int) else None

    @property
    def runtime(self) -> str:
        """Where the table was timed (tables from before it was recorded: torch)."""
        return str(self.meta.get("runtime") or "torch")

    def frame_note(self, dims: Dims) -> str | None:
        """A warning for callers to print when the table was timed at another token count."""
        n = self.num_tokens
        if n is not None and dims.complete and n != dims.num_tokens:
            return (f"the latency table was measured with {n} tokens but the model has "
                    f"{dims.num_tokens}; latencies are estimates for the table's token count")
        timed = self.meta.get("token_scale")  # tables from before it was recorded: unknown
        if timed is not None and bool(timed) != bool(dims.token_scale):
            return (f"the latency table was timed {'with' if timed else 'without'} the token "
                    f"scale this model {'lacks' if timed else 'has'}")
        return None

    def settings_note(self, device_type: str, precision: str, device_name: str | None = None
                      ) -> str | None:
        """Timed on a CPU for a CUDA run, on another GPU model, or in another precision
        (`precision_name`: fp32 for an --amp run, fp16 for a bf16 one, ...): the ranking then
        follows that device and precision. A warning, not an error: the table should describe
        where the model will be deployed, which may not be where it is pruned."""
        timed_on = str(self.meta.get("device", "")).split(":")[0] or None
        timed_name = self.meta.get("device_name")
        timed_precision = self.meta.get("dtype")  # older tables: only whether autocast was on
        if timed_precision is None and isinstance(self.meta.get("amp"), bool):
            timed_precision = "autocast" if self.meta["amp"] else FP32
        same_precision = timed_precision is None or timed_precision == precision or (
            timed_precision == "autocast" and precision.startswith("autocast"))
        other_gpu = (device_type == "cuda" and timed_on == "cuda" and device_name is not None
                     and timed_name is not None and timed_name != device_name)
        if (timed_on is None or timed_on == device_type) and not other_gpu and same_precision:
            return None
        where = f"{timed_on} ({timed_name})" if other_gpu else timed_on or "an unrecorded device"
        here = f"{device_type} ({device_name})" if other_gpu else device_type
        return (f"the latency table was timed on {where} in "
                f"{timed_precision or 'an unrecorded precision'} (batch "
                f"{self.meta.get('batch_size', '?')}), this run prunes on {here} in {precision}: "
                f"the ranking follows the table's device and precision; build the table where "
                f"and as you deploy")

    def coverage_note(self, dims: Dims) -> str | None:
        """A grid that starts above the model's widest layer on some axis holds the latency
        there constant (clamped), so pruning along that axis looks free of effect."""
        for part, grid in self.parts.items():
            for axis, pts in zip(grid.axes, grid.points):
                values = getattr(dims, axis)
                widest = max(values) if isinstance(values, list) else values
                if len(pts) > 1 and widest <= pts[0]:
                    return (f"its {part} grid starts at {axis} {pts[0]:g}, above the model's "
                            f"widest {axis} {widest}, so pruning {axis} changes no latency")
        return None

    # ------------------------------------------------------------- building
    @staticmethod
    def make_dict(meta: dict, attention_axes: dict[str, list], attention: list,
                  mlp_axes: dict[str, list], mlp: list, stem_axes: dict[str, list] | None = None,
                  stem: list | None = None, unit: str = "ms") -> dict:
        """The nvit-format JSON content (see the class docstring)."""
        data = {"format": TABLE_FORMAT, "version": 1, "unit": unit, "meta": dict(meta),
                "attention": {"axes": {a: list(attention_axes[a]) for a in ATTENTION_AXES},
                              "latency": attention},
                "mlp": {"axes": {a: list(mlp_axes[a]) for a in MLP_AXES}, "latency": mlp}}
        if stem is not None:
            data["stem"] = {"axes": {a: list(stem_axes[a]) for a in STEM_AXES}, "latency": stem}
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = TABLE_SOURCE) -> "LatencyTable":
        """Read either format; `source` names the flag/file in error messages."""
        if not isinstance(data, dict) or not data:
            raise UserError(f"{source}: expected a JSON object holding a latency table, got "
                            f"{'an empty object' if isinstance(data, dict) else type(data).__name__}")
        if "format" in data or "attention" in data or "mlp" in data:
            return cls._from_nvit(data, source)
        if any(isinstance(k, str) and k.startswith("EMB_") for k in data):
            return cls._from_reference(data, source)
        raise UserError(f"{source}: not a latency table: expected the nvit format (keys "
                        f"'format', 'attention', 'mlp') or NViT's nested EMB_*/QK_*_*/V_*/MLP_* "
                        f"keys; found keys {sorted(map(str, data))[:5]}")

    @classmethod
    def _from_nvit(cls, data: dict, source: str) -> "LatencyTable":
        fmt = data.get("format", TABLE_FORMAT)
        if fmt != TABLE_FORMAT:
            raise UserError(f"{source}: unknown table format {fmt!r} (expected {TABLE_FORMAT!r})")
        version = data.get("version", 1)
        if version != 1:
            raise UserError(f"{source}: table version {version!r} is not supported (expected 1)")
        unit = data.get("unit", "ms")
        if unit not in _UNITS_TO_MS:
            raise UserError(f"{source}: unit {unit!r} is not one of {sorted(_UNITS_TO_MS)}")
        scale = _UNITS_TO_MS[unit]
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise UserError(f"{source}: 'meta' must be an object, got {type(meta).__name__}")
        unknown = set(data) - {"format", "version", "unit", "meta", "attention", "mlp", "stem"}
        if unknown:
            raise UserError(f"{source}: unknown key(s) {sorted(unknown)}")
        parts = {}
        for part, axes in (("attention", ATTENTION_AXES), ("mlp", MLP_AXES)):
            if part not in data:
                raise UserError(f"{source}: the '{part}' grid is missing")
            parts[part] = _read_grid(data[part], part, axes, scale, source)
        stem = None
        if data.get("stem") is not None:
            stem = _read_grid(data["stem"], "stem", STEM_AXES, scale, source)
        return cls(parts, stem, dict(meta), "nvit")

    @classmethod
    def _from_reference(cls, data: dict, source: str) -> "LatencyTable":
        entries: dict[tuple, float] = {}
        for ek, by_qk in data.items():
            e = _key_ints(ek, "EMB", 1, source)
            for qk_key, by_v in _items(by_qk, ek, source):
                h, q = _key_ints(qk_key, "QK", 2, source, ek)
                for vk, by_m in _items(by_v, f"{ek}/{qk_key}", source):
                    v = _key_ints(vk, "V", 1, source, f"{ek}/{qk_key}")
                    for mk, value in _items(by_m, f"{ek}/{qk_key}/{vk}", source):
                        m = _key_ints(mk, "MLP", 1, source, f"{ek}/{qk_key}/{vk}")
                        where = f"{ek}/{qk_key}/{vk}/{mk}"
                        entries[(e, h, q, v, m)] = _number(value, where, source)
        axes = [sorted({k[d] for k in entries}) for d in range(5)]
        mlp_at = {m: (0 if m == 1 else m) for m in axes[4]}  # the reference's grid: MLP_1 at 0
        values = np.empty([len(a) for a in axes])
        index = [{p: i for i, p in enumerate(a)} for a in axes]
        for combo in itertools.product(*axes):
            if combo not in entries:
                e, h, q, v, m = combo
                raise UserError(f"{source}: the NViT-format table is not a full grid: "
                                f"EMB_{e}/QK_{h}_{q}/V_{v}/MLP_{m} is missing")
            values[tuple(index[d][c] for d, c in enumerate(combo))] = entries[combo] * 1000.0
        # as the reference's RegularGridInterpolator: zero latency at embed width 0
        axes[0] = [0] + axes[0]
        axes[4] = [mlp_at[m] for m in axes[4]]
        values = np.concatenate([np.zeros((1, *values.shape[1:])), values], axis=0)
        grid = _Grid(("embed_dim", *ATTENTION_AXES[1:], "mlp_dim"), axes, values, monotone=False)
        meta = {"source_format": "NViT reference (EMB_*/QK_*_*/V_*/MLP_*)", "source_unit": "s"}
        return cls({"block": grid}, None, meta, "reference")


# ------------------------------------------------------------- table parsing helpers
def _number(value, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{source}: {where} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{source}: {where} must be a finite non-negative latency, got {value!r}")
    return float(value)


def _items(node, where: str, source: str):
    if not isinstance(node, dict) or not node:
        raise UserError(f"{source}: {where} must map to a non-empty object, got {node!r:.60}")
    return node.items()


def _key_ints(key, prefix: str, count: int, source: str, where: str = "") -> int | tuple:
    pattern = prefix + "".join(r"_(\d+)" for _ in range(count))
    match = re.fullmatch(pattern, str(key))
    if not match or any(int(g) <= 0 for g in match.groups()):
        shape = "QK_<heads>_<qk per head>" if count == 2 else f"{prefix}_<n>"
        inside = f" inside {where}" if where else ""
        raise UserError(f"{source}: key {key!r}{inside} is not of the form {shape} "
                        f"(positive integers)")
    ints = tuple(int(g) for g in match.groups())
    return ints[0] if count == 1 else ints


def _read_grid(node, part: str, axes: tuple[str, ...], scale: float, source: str) -> _Grid:
    if not isinstance(node, dict):
        raise UserError(f"{source}: '{part}' must be an object with 'axes' and 'latency'")
    missing = [k for k in ("axes", "latency") if k not in node]
    if missing:
        raise UserError(f"{source}: '{part}' lacks {missing}")
    given = node["axes"]
    if not isinstance(given, dict) or set(given) != set(axes):
        got = sorted(given) if isinstance(given, dict) else type(given).__name__
        raise UserError(f"{source}: '{part}' axes must be exactly {list(axes)}, got {got}")
    points = []
    for a in axes:
        p = given[a]
        if (not isinstance(p, list) or not p
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in p)):
            raise UserError(f"{source}: '{part}' axis {a} must be a non-empty list of numbers")
        if any(not math.isfinite(x) or x <= 0 for x in p) or any(
                b <= a_ for a_, b in zip(p, p[1:])):
            raise UserError(f"{source}: '{part}' axis {a} must be positive and strictly "
                            f"increasing, got {p}")
        points.append(p)
    shape = tuple(len(p) for p in points)
    values = np.empty(shape)

    def fill(sub, idx: tuple) -> None:
        depth = len(idx)
        if depth == len(shape):
            values[idx] = _number(sub, f"'{part}' latency{list(idx)}", source) * scale
            return
        if not isinstance(sub, list) or len(sub) != shape[depth]:
            n = len(sub) if isinstance(sub, list) else type(sub).__name__
            raise UserError(f"{source}: '{part}' latency{list(idx)} should be a list of "
                            f"{shape[depth]} (axis {axes[depth]}), got {n}")
        for i, s in enumerate(sub):
            fill(s, (*idx, i))

    fill(node["latency"], ())
    return _Grid(axes, points, values)


# ---------------------------------------------------------------------- factory
def build_cost_model(kind: str, dims, table: dict | None = None) -> CostModel:
    """The cost model for `--cost KIND` of a ViT's Dims or a Swin's SwinDims; "latency"
    needs the table's JSON content."""
    from models.swin_dims import SwinDims
    swin = isinstance(dims, SwinDims)
    if swin:
        from .cost_swin import SwinMacsCost, SwinParamsCost
    if kind == "macs":
        return SwinMacsCost(dims) if swin else MacsCost(dims)
    if kind == "params":
        return SwinParamsCost(dims) if swin else ParamsCost(dims)
    if kind == "latency":
        if table is None:
            raise UserError("the latency cost needs a latency table", field="latency_table")
        from .cost_swin import SwinLatencyTable, is_swin_table
        try:
            built = (SwinLatencyTable.from_dict(table) if is_swin_table(table)
                     else LatencyTable.from_dict(table))
        except UserError as e:
            e.field = e.field or "latency_table"
            raise
        if isinstance(built, SwinLatencyTable) != swin:
            raise UserError("the latency table was timed for " + (
                "a Swin's stages, this model is a ViT" if not swin else
                "a ViT's blocks; a Swin's is timed per stage at each stage's tokens and "
                "window") + "; build the table for this model", field="latency_table")
        return built.bind(dims) if swin else built
    raise UserError(f"cost {kind!r} is not one of {', '.join(KINDS)}", field="cost")
