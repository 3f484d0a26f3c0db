"""The dims spec: everything needed to rebuild a per-block-dims DeiT without editing code.

A spec has the shared embedding width, per-block lists of heads, QK width per head, V width
per head and MLP width, a per-block attention scale, two flavour fields (a learnable
per-token scale on q, k and v, and the initialisation), and the "frame" (image size, patch
size, channels, classes, distilled), and the timm ViT family's structure (class token,
register tokens, LayerScale, qkv bias, position embedding without the prefix tokens,
pooling, fc_norm). Frame and family fields may be left as None in a spec written by hand or
by the ReViT rule; `with_frame` fills them from a model name and the user's flags, and a
family field still None means DeiT's (`FAMILY_DEFAULTS`), so older specs and checkpoints
keep their meaning.

The flavour defaults are timm's ViT (scale 1/sqrt(QK width), no token scale, trunc-normal
init), so a spec or checkpoint written without these fields keeps its meaning; the NViT
reference's ReViT (`revit_dims`, the released NViT models) sets scale 64^-0.5, the token
scale and PyTorch's default init.
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
FRAME_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "distilled")
# "trunc_normal": timm/DeiT, every Linear trunc-normal(0.02) with zero bias.
# "torch_default": the NViT reference's ReViT, attention, MLP and patch-embedding layers keep
# PyTorch's default init; tokens, position embedding and classifier heads trunc-normal(0.02).
INITS = ("trunc_normal", "torch_default")
# The timm ViT family fields and their DeiT values; timm's VisionTransformer arguments of the
# same names (layer_scale: timm's init_values, 0 = no LayerScale; fc_norm: the final norm
# applies to the pooled features instead of the token stream; pre_norm: CLIP's LayerNorm
# `norm_pre` before the blocks, and no patch-embedding bias as timm then builds it; ln_eps:
# every LayerNorm's eps; mlp_act: the MLP's activation, timm's name; qk_norm: a LayerNorm over
# each head's q and k; mlp_norm: a LayerNorm over the MLP's hidden units, timm's scale_mlp;
# attn_norm: a LayerNorm over the attention's output (all heads' V dims) before its
# projection, timm's scale_attn_inner / scale_attn_norm;
# qkv_fused false: q, k and v are separate projections `q_proj`, `k_proj`, `v_proj`, as timm
# builds them with qkv_fused=False). timm's Eva class (EVA-02, the RoPE ViTs): layout "eva"
# names LayerScale `gamma_1`/`gamma_2` as its blocks do; k_bias false: with qkv_bias, K has
# no bias (Eva's attention keeps `q_bias` and `v_bias`); abs_pos_embed false: no learned
# position embedding; rope_dim > 0: rotary position embedding (timm's RotaryEmbeddingCat,
# axial, over a table rope_dim wide per head) with its temperature, grid indexing ("ij" or
# "xy"), reference grid side (0: none) and pair layout (rope_half: (i, i + d/2), else
# interleaved (2i, 2i + 1)).
FAMILY_DEFAULTS = dict(class_token=True, reg_tokens=0, layer_scale=0.0, qkv_bias=True,
                       no_embed_class=False, global_pool="token", fc_norm=False, pre_norm=False,
                       ln_eps=1e-6, mlp_act="gelu", qk_norm=False, mlp_norm=False, attn_norm=False,
                       qkv_fused=True, layout="vit", k_bias=True,
                       abs_pos_embed=True, rope_dim=0, rope_temperature=10000.0,
                       rope_grid_indexing="ij", rope_ref_grid=0, rope_half=False)
FAMILY_FIELDS = tuple(FAMILY_DEFAULTS)
GLOBAL_POOLS = ("token", "avg", "map")  # map: SigLIP's attention pooling (pool_* fields)
POOL_FIELDS = ("pool_dim", "pool_heads", "pool_mlp_dim")
# exact GELU; CLIP's x * sigmoid(1.702 x); DINOv2-g's SwiGLU, fc1 packing gate and value rows
# "swiglu": timm's SwiGLU, the gate and value rows in layers of their own (fc1_g, fc1_x)
MLP_ACTS = ("gelu", "quick_gelu", "swiglu_packed", "swiglu")
LAYOUTS = ("vit", "eva")  # whose parameter names: timm's VisionTransformer or Eva
ROPE_GRID_INDEXINGS = ("ij", "xy")
REFERENCE_ATTN_SCALE = 64 ** -0.5  # the NViT reference's scale in every block, whatever the QK width


@dataclass
class Dims:
    embed_dim: int
    num_heads: list[int]
    qk_dim: list[int]  # per head
    v_dim: list[int]  # per head
    mlp_dim: list[int]
    depth: int | None = None
    attn_scale: list[float] | None = None  # None: 1/sqrt(qk_dim) per block
    token_scale: bool = False  # q, k, v of each block times a learnable per-token scale (init 1)
    init: str = "trunc_normal"  # one of INITS
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    num_classes: int | None = None
    distilled: bool | None = None
    class_token: bool | None = None
    reg_tokens: int | None = None
    layer_scale: float | None = None
    qkv_bias: bool | None = None
    no_embed_class: bool | None = None
    global_pool: str | None = None
    fc_norm: bool | None = None
    pre_norm: bool | None = None
    ln_eps: float | None = None
    mlp_act: str | None = None
    qk_norm: bool | None = None
    mlp_norm: bool | None = None
    attn_norm: bool | None = None
    qkv_fused: bool | None = None
    # global_pool "map": the attention pool's attention width and heads and its MLP's width
    pool_dim: int | None = None
    pool_heads: int | None = None
    pool_mlp_dim: int | None = None
    layout: str | None = None
    k_bias: bool | None = None
    abs_pos_embed: bool | None = None
    rope_dim: int | None = None
    rope_temperature: float | None = None
    rope_grid_indexing: str | None = None
    rope_ref_grid: int | None = None
    rope_half: bool | None = None
    # per block, the dims of the rotary table (of rope_dim) its QK dims rotate by, in order
    # (what a pruned block kept); None: every block rotates by the whole table
    rope_dims: list[list[int]] | None = None

    def __post_init__(self) -> None:
        for name in BLOCK_LISTS:
            value = getattr(self, name)
            if isinstance(value, int):  # a single number means "the same in every block"
                if self.depth is None:
                    raise UserError(f"dims: {name} is a single number, so depth must be given")
                setattr(self, name, [value] * self.depth)
            else:
                setattr(self, name, [int(v) for v in value])
        if self.depth is None:
            self.depth = len(self.num_heads)
        if self.attn_scale is None:
            self.attn_scale = [1.0 / math.sqrt(q) if q > 0 else 1.0 for q in self.qk_dim]
        elif isinstance(self.attn_scale, (int, float)):
            self.attn_scale = [float(self.attn_scale)] * self.depth
        else:
            self.attn_scale = [float(s) for s in self.attn_scale]
        if self.global_pool == "map":  # timm's AttentionPoolLatent as a ViT builds it
            for name, value in (("pool_dim", self.embed_dim), ("pool_heads", self.num_heads[0]),
                                ("pool_mlp_dim", self.mlp_dim[0])):
                if getattr(self, name) is None:
                    setattr(self, name, value)
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Refuse specs that cannot be built, naming the offending field."""
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise UserError(f"dims: embed_dim must be a positive integer, got {self.embed_dim!r}")
        if self.depth <= 0:
            raise UserError(f"dims: depth must be positive, got {self.depth}")
        if not isinstance(self.token_scale, bool):
            raise UserError(f"dims: token_scale must be true or false, got {self.token_scale!r}")
        if self.init not in INITS:
            raise UserError(f"dims: init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in (*BLOCK_LISTS, "attn_scale"):
            value = getattr(self, name)
            if len(value) != self.depth:
                raise UserError(
                    f"dims: {name} has {len(value)} entries but depth is {self.depth}")
            bad = [i for i, v in enumerate(value) if not v > 0]
            if bad:
                raise UserError(
                    f"dims: {name} must be positive in every block; block {bad[0]} has {value[bad[0]]}")
        for name in ("img_size", "patch_size", "in_chans"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value <= 0):
                raise UserError(f"dims: {name} must be a positive integer, got {value!r}")
        if self.num_classes is not None and (int(self.num_classes) != self.num_classes
                                             or self.num_classes < 0):
            raise UserError(f"dims: num_classes must be an integer >= 0 (0: no classifier, a "
                            f"backbone), got {self.num_classes!r}")
        if self.reg_tokens is not None and (int(self.reg_tokens) != self.reg_tokens
                                            or self.reg_tokens < 0):
            raise UserError(f"dims: reg_tokens must be an integer >= 0, got {self.reg_tokens!r}")
        if self.layer_scale is not None and not self.layer_scale >= 0:
            raise UserError(f"dims: layer_scale (LayerScale's initial value, 0: none) must be "
                            f">= 0, got {self.layer_scale!r}")
        if self.ln_eps is not None and not self.ln_eps > 0:
            raise UserError(f"dims: ln_eps (every LayerNorm's eps) must be > 0, got {self.ln_eps!r}")
        if self.family("mlp_act") not in MLP_ACTS:
            raise UserError(f"dims: mlp_act must be one of {', '.join(MLP_ACTS)}, got "
                            f"{self.mlp_act!r}")
        pool = self.family("global_pool")
        if pool not in GLOBAL_POOLS:
            raise UserError(f"dims: global_pool must be one of {', '.join(GLOBAL_POOLS)}, "
                            f"got {pool!r}")
        if pool == "map":
            bad = [f for f in POOL_FIELDS
                   if not (_is_int(getattr(self, f)) and getattr(self, f) > 0)]
            if bad:
                raise UserError(f"dims: global_pool 'map' needs positive integers {', '.join(bad)} "
                                f"(the attention pool's width, heads and MLP width)")
            if self.pool_dim % self.pool_heads:
                raise UserError(f"dims: pool_dim {self.pool_dim} is not divisible by "
                                f"{self.pool_heads} pool_heads")
        if self.family("layout") not in LAYOUTS:
            raise UserError(f"dims: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        self._validate_rope()
        if pool == "token" and not self.family("class_token"):
            raise UserError("dims: global_pool 'token' needs a class token (class_token: true)")
        if self.distilled and (not self.family("class_token") or pool != "token"
                               or self.family("fc_norm")):
            raise UserError("dims: a distilled model pools its class and distillation tokens "
                            "(class_token: true, global_pool: token, fc_norm: false)")
        if self.img_size is not None and self.patch_size is not None:
            if self.img_size % self.patch_size:
                raise UserError(
                    f"dims: image size {self.img_size} is not divisible by patch size {self.patch_size}")

    def _validate_rope(self) -> None:
        rope = self.family("rope_dim")
        if not (_is_int(rope) and rope >= 0 and rope % 4 == 0):
            raise UserError(f"dims: rope_dim (the rotary table's width per head, 0: none) must be "
                            f"a multiple of 4 (two axes of pairs), got {rope!r}")
        if self.family("rope_grid_indexing") not in ROPE_GRID_INDEXINGS:
            raise UserError(f"dims: rope_grid_indexing must be one of "
                            f"{', '.join(ROPE_GRID_INDEXINGS)}, got {self.rope_grid_indexing!r}")
        if self.rope_dims is None:
            return
        if not rope or len(self.rope_dims) != self.depth:
            raise UserError(f"dims: rope_dims needs rope_dim > 0 and one list per block "
                            f"({self.depth})")
        for i, kept in enumerate(self.rope_dims):
            if list(kept) != sorted(set(kept)) or any(not 0 <= d < rope for d in kept):
                raise UserError(f"dims: rope_dims of block {i} must be distinct table dims "
                                f"below {rope}, ascending")

    def rope_index(self, block: int) -> list[int] | None:
        """The rotary table dims block `block` rotates its QK dims by (None: the whole table,
        as it is); refuses a block whose QK width does not fit them, or whose pairs are split."""
        rope = self.family("rope_dim")
        if not rope:
            return None
        kept = None if self.rope_dims is None else list(self.rope_dims[block])
        width = rope if kept is None else len(kept)
        if self.qk_dim[block] != width:
            raise UserError(f"dims: block {block} has QK width {self.qk_dim[block]} but rotates "
                            f"by {width} rotary dims (rope_dim / rope_dims)", field="dims")
        if kept is None or kept == list(range(rope)):
            return None
        partner = {d: rope_partner(d, rope, self.family("rope_half")) for d in kept}
        if any(p not in partner for p in partner.values()):
            raise UserError(f"dims: rope_dims of block {block} splits a rotary pair", field="dims")
        return kept

    # ------------------------------------------------------------ properties
    @property
    def complete(self) -> bool:
        return all(getattr(self, f) is not None for f in FRAME_FIELDS)

    def family(self, name: str):
        """A family field's value, DeiT's where the spec leaves it None."""
        value = getattr(self, name)
        return FAMILY_DEFAULTS[name] if value is None else value

    def with_family_defaults(self) -> "Dims":
        """The same spec with every family field explicit (what a model records)."""
        return replace(self, **{n: self.family(n) for n in FAMILY_FIELDS})

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers (in that order)."""
        return (int(self.family("class_token")) + int(bool(self.distilled))
                + self.family("reg_tokens"))

    @property
    def num_classifier_heads(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens every block sees."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def pos_embed_prefix(self) -> int:
        """Prefix tokens the position embedding covers (none with no_embed_class, as timm)."""
        return 0 if self.family("no_embed_class") else self.num_prefix_tokens

    @property
    def pos_embed_tokens(self) -> int:
        return self.num_patches + self.pos_embed_prefix

    @property
    def streams(self) -> list[int]:
        """The embedding width of each residual stream: a ViT has one."""
        return [self.embed_dim]

    def stream_of(self, block: int) -> int:
        """The stream block `block` belongs to."""
        return 0

    def embed_value(self, widths: list[int]) -> int:
        """What the embed_dim field holds for these per-stream widths."""
        (width,) = widths
        return width

    @property
    def is_uniform(self) -> bool:
        return all(len(set(getattr(self, n))) == 1 for n in (*BLOCK_LISTS, "attn_scale"))

    def block(self, i: int) -> dict:
        """Widths of block i as keyword arguments for the block constructor."""
        return {n: getattr(self, n)[i] for n in (*BLOCK_LISTS, "attn_scale")}

    # ----------------------------------------------------------- derivations
    def truncated(self, depth: int) -> "Dims":
        """The first `depth` blocks (a backbone cut after an intermediate layer)."""
        rope_dims = None if self.rope_dims is None else self.rope_dims[:depth]
        return replace(self, depth=depth, attn_scale=self.attn_scale[:depth], rope_dims=rope_dims,
                       **{n: getattr(self, n)[:depth] for n in BLOCK_LISTS})

    def with_frame(self, **frame) -> "Dims":
        """Fill frame (and family) fields: given non-None values win over the spec's."""
        unknown = set(frame) - set(FRAME_FIELDS) - set(FAMILY_FIELDS)
        if unknown:
            raise TypeError(f"not frame or family fields: {sorted(unknown)}")
        updates = {k: v for k, v in frame.items() if v is not None}
        return replace(self, **updates)

    @classmethod
    def uniform(cls, embed_dim: int, depth: int, num_heads: int, mlp_dim: int,
                qk_dim: int | None = None, **frame) -> "Dims":
        """A plain DeiT/ViT: every block the same; QK and V width per head = embed/heads."""
        if embed_dim % num_heads and qk_dim is None:
            raise UserError(f"dims: embed_dim {embed_dim} is not divisible by {num_heads} heads")
        head_dim = qk_dim or embed_dim // num_heads
        return cls(embed_dim, [num_heads] * depth, [head_dim] * depth, [head_dim] * depth,
                   [mlp_dim] * depth, **frame)

    # ------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "dims") -> "Dims":
        """A spec from a file or a checkpoint, strictly typed: 12.5, true or "16" where an
        integer belongs is refused (naming field and block), never rounded or coerced."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of dims fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown dims field(s) {unknown}; known: {sorted(known)}")
        missing = [n for n in ("embed_dim", *BLOCK_LISTS) if n not in data]
        if missing:
            raise UserError(f"{source}: missing dims field(s) {missing}")
        _check_types(data, source)
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

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dims":
        return cls.from_dict(cls.read_file(path), source=f"dims file {path}")

    @staticmethod
    def read_file(path: str | os.PathLike):
        """A dims file's content (YAML for .yaml/.yml, else JSON), refused in one line when
        absent or malformed."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"dims file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"dims file {path} is not a text file (expected YAML or JSON)") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # yaml and json raise different types; both mean "malformed"
            raise UserError(f"dims file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                            f"{str(e).splitlines()[0]}") from None
        return data


def rope_partner(d: int, width: int, half: bool) -> int:
    """The other dim of d's rotary pair in a head `width` wide: (i, i + width/2) in the half
    layout, (2i, 2i + 1) interleaved (timm's rotate_half false)."""
    if half:
        return d + width // 2 if d < width // 2 else d - width // 2
    return d ^ 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# the type each field must have in a file: (test, what the message calls it)
_SCALAR_TYPES = {
    "embed_dim": (_is_int, "an integer"), "depth": (_is_int, "an integer"),
    "token_scale": (lambda v: isinstance(v, bool), "true or false"),
    "init": (lambda v: isinstance(v, str), "a string"),
    "img_size": (_is_int, "an integer"), "patch_size": (_is_int, "an integer"),
    "in_chans": (_is_int, "an integer"), "num_classes": (_is_int, "an integer"),
    "distilled": (lambda v: isinstance(v, bool), "true or false"),
    "class_token": (lambda v: isinstance(v, bool), "true or false"),
    "reg_tokens": (_is_int, "an integer"), "layer_scale": (_is_number, "a number"),
    "qkv_bias": (lambda v: isinstance(v, bool), "true or false"),
    "no_embed_class": (lambda v: isinstance(v, bool), "true or false"),
    "global_pool": (lambda v: isinstance(v, str), "a string"),
    "fc_norm": (lambda v: isinstance(v, bool), "true or false"),
    "pre_norm": (lambda v: isinstance(v, bool), "true or false"),
    "ln_eps": (_is_number, "a number"),
    "mlp_act": (lambda v: isinstance(v, str), "a string"),
    "qk_norm": (lambda v: isinstance(v, bool), "true or false"),
    "mlp_norm": (lambda v: isinstance(v, bool), "true or false"),
    "attn_norm": (lambda v: isinstance(v, bool), "true or false"),
    "qkv_fused": (lambda v: isinstance(v, bool), "true or false"),
    "pool_dim": (_is_int, "an integer"), "pool_heads": (_is_int, "an integer"),
    "pool_mlp_dim": (_is_int, "an integer"),
    "layout": (lambda v: isinstance(v, str), "a string"),
    "k_bias": (lambda v: isinstance(v, bool), "true or false"),
    "abs_pos_embed": (lambda v: isinstance(v, bool), "true or false"),
    "rope_dim": (_is_int, "an integer"), "rope_temperature": (_is_number, "a number"),
    "rope_grid_indexing": (lambda v: isinstance(v, str), "a string"),
    "rope_ref_grid": (_is_int, "an integer"),
    "rope_half": (lambda v: isinstance(v, bool), "true or false"),
    "rope_dims": (lambda v: isinstance(v, list) and all(
        isinstance(b, list) and all(_is_int(d) for d in b) for b in v), "a list of integer lists"),
}


def _check_types(data: dict, source: str) -> None:
    for name, (ok, what) in _SCALAR_TYPES.items():
        value = data.get(name)
        if value is not None and not ok(value):
            raise UserError(f"{source}: {name} must be {what}, got {value!r}")
    for name in (*BLOCK_LISTS, "attn_scale"):
        value = data.get(name)
        ok, what = (_is_number, "a number") if name == "attn_scale" else (_is_int, "an integer")
        if value is None and name == "attn_scale":
            continue
        if ok(value):  # one value for every block
            continue
        if not isinstance(value, list):
            raise UserError(f"{source}: {name} must be {what} or a list with one per block, "
                            f"got {value!r}")
        for i, v in enumerate(value):
            if not ok(v):
                raise UserError(f"{source}: {name} of block {i} must be {what}, got {v!r}")


def _revit_factors(emb: int) -> tuple[int, int]:
    return round(0.005 * emb), round(0.05 * emb / 8)


def smallest_valid_emb() -> int:
    """Smallest EMB for which the ReViT rule gives at least one head and QK dim."""
    emb = 1
    while min(_revit_factors(emb)) < 1:
        emb += 1
    return emb


def revit_dims(emb: int, **frame) -> Dims:
    """The NViT paper's redistributed 12-block shape for embedding width `emb`.

    heads [10, 2k, 2k, 4k x6, 2k, 2k, 10], QK per head [16q, 8q, 8q, 16q x6, 8q, 8q, 16q],
    V per head 64, MLP [3E x3, 6E x6, 3E x3] with k = round(0.005 E), q = round(0.05 E / 8);
    the reference's model around them: attention scale 64^-0.5 in every block, a learnable
    token scale on q, k and v, PyTorch's default init.
    """
    if not isinstance(emb, int) or isinstance(emb, bool):
        raise UserError(f"EMB must be an integer, got {emb!r}", field="emb")
    k, q = _revit_factors(emb)
    if k < 1 or q < 1:
        raise UserError(
            f"EMB {emb} gives {k * 2} heads and QK width {q * 8} in some blocks; "
            f"the ReViT rule needs EMB >= {smallest_valid_emb()} (e.g. 176 or 384)", field="emb")
    heads = [10, 2 * k, 2 * k] + [4 * k] * 6 + [2 * k, 2 * k, 10]
    qk = [16 * q, 8 * q, 8 * q] + [16 * q] * 6 + [8 * q, 8 * q, 16 * q]
    mlp = [3 * emb] * 3 + [6 * emb] * 6 + [3 * emb] * 3
    return Dims(emb, heads, qk, [64] * 12, mlp, attn_scale=[REFERENCE_ATTN_SCALE] * 12,
                token_scale=True, init="torch_default", **frame)
