"""The dims spec of a hierarchical ViT (Swin v1 and v2): stages, each with its own embedding
width, and per-block heads, QK width per head, V width per head and MLP width.

A Swin is a ViT in stages: patch embedding into stage 0's width, then per stage a patch
merging (2x2 neighbouring tokens concatenated and projected to the stage's width; none in
stage 0) and its blocks, attending within windows (every second block's windows shifted by
half a window), then a final norm, average pooling and the classifier. Each stage's
embedding channels are a residual stream of their own, pruned on their own; the blocks'
lists run over all stages in order (`depths` says how many each has), as in `Dims`.

Fields as timm's `SwinTransformer` / `SwinTransformerV2` arguments: `window_size` per stage
is timm's (a stage whose patch grid is no larger than the window attends over the whole
grid, unshifted, as timm clamps it), `pretrained_window_size` (v2) scales the continuous
position bias' coordinates, `attn_scale` (v1) is the scale of q (1/sqrt(QK width) of the
model it came from; kept when QK is pruned, as in ViTs). A file may give each block list as
one number, a flat list over all blocks, or one list per stage.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from atomic import write_text_atomic
from errors import UserError

BLOCK_LISTS = ("num_heads", "qk_dim", "v_dim", "mlp_dim")
STAGE_LISTS = ("embed_dim", "depths", "window_size")
FRAME_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes")
VERSIONS = (1, 2)
GLOBAL_POOLS = ("avg", "")  # timm's ClassifierHead: average over the token grid, or none
LN_EPS = 1e-5  # torch's LayerNorm default, which timm's Swins use
CPB_HIDDEN = 512  # v2's continuous position bias MLP width (timm's)


@dataclass
class SwinDims:
    embed_dim: list[int]  # per stage
    depths: list[int]  # blocks per stage
    num_heads: list[int]  # per block, all stages in order
    qk_dim: list[int]  # per head
    v_dim: list[int]  # per head
    mlp_dim: list[int]
    window_size: list[int]  # per stage
    version: int = 1
    attn_scale: list[float] | None = None  # v1, per block; None: 1/sqrt(qk_dim)
    pretrained_window_size: list[int] | None = None  # v2, per stage; None: 0 (the window)
    qkv_bias: bool = True
    init: str = "trunc_normal"
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    num_classes: int | None = None
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        for name in STAGE_LISTS:
            value = getattr(self, name)
            if isinstance(value, int) and name == "window_size":
                value = [value] * len(self.depths)
            setattr(self, name, [v for v in value] if isinstance(value, list) else value)
        depth = sum(self.depths) if isinstance(self.depths, list) else None
        for name in BLOCK_LISTS:
            setattr(self, name, _flat(getattr(self, name), self.depths, depth, name))
        if self.attn_scale is None:
            self.attn_scale = [1.0 / math.sqrt(q) for q in self.qk_dim]
        else:
            self.attn_scale = [float(s) for s in _flat(self.attn_scale, self.depths, depth,
                                                       "attn_scale", number=True)]
        if self.pretrained_window_size is None:
            self.pretrained_window_size = [0] * len(self.depths)
        elif isinstance(self.pretrained_window_size, int):
            self.pretrained_window_size = [self.pretrained_window_size] * len(self.depths)
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Refuse specs that cannot be built, naming the offending field."""
        S = len(self.depths)
        if S == 0:
            raise UserError("dims: depths must list at least one stage")
        for name in STAGE_LISTS + ("pretrained_window_size",):
            value = getattr(self, name)
            if len(value) != S:
                raise UserError(f"dims: {name} has {len(value)} entries but depths has {S} stages")
            minimum = 0 if name == "pretrained_window_size" else 1
            bad = [i for i, v in enumerate(value) if not (_is_int(v) and v >= minimum)]
            if bad:
                raise UserError(f"dims: {name} of stage {bad[0]} must be an integer >= "
                                f"{minimum}, got {value[bad[0]]!r}")
        for name in (*BLOCK_LISTS, "attn_scale"):
            bad = [i for i, v in enumerate(getattr(self, name)) if not v > 0]
            if bad:
                raise UserError(f"dims: {name} must be positive in every block; block {bad[0]} "
                                f"has {getattr(self, name)[bad[0]]}")
        if self.version not in VERSIONS:
            raise UserError(f"dims: version must be 1 (Swin) or 2 (Swin v2), got {self.version!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise UserError(f"dims: global_pool must be 'avg' or '' (none), got {self.global_pool!r}")
        if self.init != "trunc_normal":
            raise UserError(f"dims: a Swin initialises as timm's (trunc_normal), got {self.init!r}")
        for name in ("img_size", "patch_size", "in_chans"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value > 0):
                raise UserError(f"dims: {name} must be a positive integer, got {value!r}")
        if self.num_classes is not None and not (_is_int(self.num_classes) and self.num_classes >= 0):
            raise UserError(f"dims: num_classes must be an integer >= 0 (0: no classifier, a "
                            f"backbone), got {self.num_classes!r}")
        if self.img_size is not None and self.patch_size is not None and self.img_size % self.patch_size:
            raise UserError(f"dims: image size {self.img_size} is not divisible by patch size "
                            f"{self.patch_size}")

    # ------------------------------------------------------------ structure
    @property
    def depth(self) -> int:
        """Blocks over all stages."""
        return sum(self.depths)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def streams(self) -> list[int]:
        """The embedding width of each residual stream (one per stage)."""
        return list(self.embed_dim)

    def stream_of(self, block: int) -> int:
        """The stage (stream) block `block` belongs to."""
        end = 0
        for s, n in enumerate(self.depths):
            end += n
            if block < end:
                return s
        raise IndexError(f"block {block} of a {self.depth}-block model")

    def stage_blocks(self, stage: int) -> range:
        start = sum(self.depths[:stage])
        return range(start, start + self.depths[stage])

    def embed_value(self, widths: list[int]) -> list[int]:
        """What the embed_dim field holds for these per-stream widths."""
        return list(widths)

    @property
    def complete(self) -> bool:
        return all(getattr(self, f) is not None for f in FRAME_FIELDS)

    @property
    def distilled(self) -> bool:
        return False  # no distillation token: a Swin pools its token grid

    @property
    def token_scale(self) -> bool:
        return False

    @property
    def num_classifier_heads(self) -> int:
        return 1

    def grid(self, stage: int) -> int:
        """The token grid's side in a stage: the patch grid, halved (rounded up) per merge."""
        g = self.img_size // self.patch_size
        for _ in range(stage):
            g = (g + 1) // 2
        return g

    def window(self, stage: int) -> tuple[int, int]:
        """(window, shift) of a stage's blocks as timm sets them: a grid no larger than the
        window is one window, unshifted (the shift applies to every second block)."""
        g, w = self.grid(stage), self.window_size[stage]
        if g <= w:
            return g, 0
        return w, w // 2

    def padded_grid(self, stage: int) -> int:
        """The grid padded to whole windows (timm pads the attention's input)."""
        w, _ = self.window(stage)
        return -(-self.grid(stage) // w) * w

    def block(self, i: int) -> dict:
        """Widths of block i as keyword arguments for the block constructor."""
        return {n: getattr(self, n)[i] for n in (*BLOCK_LISTS, "attn_scale")}

    @property
    def is_uniform(self) -> bool:
        """Every stage's blocks alike (timm's Swins are: heads and widths per stage)."""
        return all(len({getattr(self, n)[i] for i in self.stage_blocks(s)}) == 1
                   for s in range(self.num_stages) for n in (*BLOCK_LISTS, "attn_scale"))

    # ----------------------------------------------------------- derivations
    def with_frame(self, **frame) -> "SwinDims":
        """Fill frame fields: given non-None values win over the spec's."""
        unknown = set(frame) - set(FRAME_FIELDS) - {"global_pool"}
        if unknown:
            raise TypeError(f"not frame fields of a Swin: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in frame.items() if v is not None})

    def truncated(self, stages: int) -> "SwinDims":
        """The first `stages` stages (a backbone cut after an intermediate stage)."""
        n = sum(self.depths[:stages])
        return replace(self, depths=self.depths[:stages], embed_dim=self.embed_dim[:stages],
                       window_size=self.window_size[:stages],
                       pretrained_window_size=self.pretrained_window_size[:stages],
                       attn_scale=self.attn_scale[:n],
                       **{k: getattr(self, k)[:n] for k in BLOCK_LISTS})

    # ------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        """The fields, block lists nested per stage (what a file holds)."""
        out = asdict(self)
        for name in (*BLOCK_LISTS, "attn_scale"):
            out[name] = [[out[name][i] for i in self.stage_blocks(s)]
                         for s in range(self.num_stages)]
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "dims") -> "SwinDims":
        """A spec from a file or a checkpoint, strictly typed (no rounding or coercion)."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of dims fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown Swin dims field(s) {unknown}; known: {sorted(known)}")
        missing = [n for n in ("embed_dim", "depths", *BLOCK_LISTS, "window_size") if n not in data]
        if missing:
            raise UserError(f"{source}: missing Swin dims field(s) {missing}")
        for name in ("version", "img_size", "patch_size", "in_chans", "num_classes"):
            if data.get(name) is not None and not _is_int(data[name]):
                raise UserError(f"{source}: {name} must be an integer, got {data[name]!r}")
        for name in ("embed_dim", "depths"):
            if not isinstance(data[name], list) or not all(_is_int(v) for v in data[name]):
                raise UserError(f"{source}: {name} must be a list of integers, one per stage, "
                                f"got {data[name]!r}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write YAML (.yaml/.yml) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml
            text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        else:
            text = json.dumps(self.to_dict(), indent=1)
        write_text_atomic(path, text)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _flat(value, depths, depth: int | None, name: str, number: bool = False) -> list:
    """A block list as one entry per block: from one value, a flat list, or per-stage lists
    (each a value or a list of its stage's blocks)."""
    ok = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)) if number else _is_int
    what = "a number" if number else "an integer"
    if ok(value):
        if depth is None:
            raise UserError(f"dims: {name} is a single number, so depths must be given")
        return [value] * depth
    if not isinstance(value, (list, tuple)):
        raise UserError(f"dims: {name} must be {what}, a list per block or a list per stage, "
                        f"got {value!r}")
    value = list(value)
    if any(isinstance(v, (list, tuple)) for v in value) or (
            depth is not None and len(value) == len(depths) != depth):
        if len(value) != len(depths):
            raise UserError(f"dims: {name} has {len(value)} stage entries but depths has "
                            f"{len(depths)} stages")
        out = []
        for s, (v, n) in enumerate(zip(value, depths)):
            if ok(v):
                out += [v] * n
            elif isinstance(v, (list, tuple)) and len(v) == n and all(ok(x) for x in v):
                out += list(v)
            else:
                raise UserError(f"dims: {name} of stage {s} must be {what} or a list of its "
                                f"{n} blocks' values, got {v!r}")
        return out
    if depth is not None and len(value) != depth:
        raise UserError(f"dims: {name} has {len(value)} entries but the stages have {depth} blocks")
    bad = [i for i, v in enumerate(value) if not ok(v)]
    if bad:
        raise UserError(f"dims: {name} of block {bad[0]} must be {what}, got {value[bad[0]]!r}")
    return value
