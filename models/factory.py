"""Building models: from a timm ViT/DeiT name, a dims spec, a foreign or our own checkpoint.

Precedence for the frame (image size, patch, classes, ...) and the family fields (class
token, registers, LayerScale, ...): explicit keyword arguments, then the dims spec or
checkpoint, then the timm model name.
"""
from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch
import timm
from timm.layers import resample_abs_pos_embed

from errors import UserError

from .checkpoint import (check_fits, fuse_split_qkv, has_split_qkv, infer_uniform_dims,
                         is_timm_vit_state, peek_checkpoint, read_checkpoint, state_dict_of)
from .dims import FAMILY_FIELDS, FRAME_FIELDS, Dims
from .hub import download_problem
from .nvit_reference import from_reference, is_reference_layout
from .revit import ReViT
from .swin import ReSwin
from .swin_dims import FRAME_FIELDS as SWIN_FRAME, SwinDims
from .swin_factory import (adapt_state as adapt_swin_state, check_frame as swin_frame,
                           is_swin_state, state_dims as swin_state_dims, timm_layout)
from .timm_swin import is_timm_swin_name, timm_swin_dims
from .timm_vit import timm_vit_dims

MODEL_KWARGS = ("drop_rate", "attn_drop_rate", "drop_path_rate")  # ours and timm's alike


@functools.lru_cache(maxsize=None)
def _name_dims(name: str, timm_kwargs: tuple) -> Dims:
    kwargs = dict(timm_kwargs)
    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"{name} is not a timm model name "
                            f"(e.g. deit_base_distilled_patch16_224)", field="name") from None
        raise
    except (TypeError, ValueError, AssertionError) as e:  # timm's word on its own kwargs
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{name} with {given}: timm refuses it ({first[:160]})",
                        field="model_kwargs") from None
    if isinstance(m, (ReViT, ReSwin)):
        return m.dims
    what = name + (f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else "")
    if "Swin" in type(m).__name__:
        return timm_swin_dims(m, what)
    return timm_vit_dims(m, what)


def name_dims(name: str, **timm_kwargs) -> Dims | SwinDims:
    """Dims (frame and family fields included) of a timm ViT/DeiT/DeiT III/DINOv2 name, or
    SwinDims of a timm Swin / Swin v2 name, as timm builds it with these keyword arguments
    (global_pool, fc_norm, class_token, reg_tokens, qkv_bias, init_values, window_size, ...:
    timm interprets them), read without allocating weights; a timm feature we do not cover
    (qk_norm=True, the swinv2_cr variant) is refused by name."""
    try:
        return _name_dims(name, tuple(sorted(timm_kwargs.items())))
    except TypeError as e:  # an unhashable value (a list): not cached
        if "unhashable" not in str(e):
            raise
        return _name_dims.__wrapped__(name, tuple(sorted(timm_kwargs.items())))


def _split_kwargs(kwargs: dict) -> tuple[dict, dict, dict]:
    """(frame fields, our model kwargs, the rest: timm's model kwargs)."""
    frame = {k: kwargs.pop(k) for k in FRAME_FIELDS if k in kwargs}
    model = {k: kwargs.pop(k) for k in MODEL_KWARGS if k in kwargs}
    return frame, model, kwargs


OURS = ("revit", "reswin")  # our registered architectures (and revit_*), as a hub folder names them


def is_our_architecture(name: str) -> bool:
    return name in OURS or name.startswith("revit_")


def model_class(dims):
    """The model class a dims spec describes: ReSwin for SwinDims, else ReViT."""
    return ReSwin if isinstance(dims, SwinDims) else ReViT


def architecture_of(dims) -> str:
    """The registered timm architecture that builds any model of this dims spec."""
    return "reswin" if isinstance(dims, SwinDims) else "revit"


def dims_from_dict(data: dict, source: str = "dims") -> Dims | SwinDims:
    """A ViT's Dims or a Swin's SwinDims (it has stages: `depths`) from a file or checkpoint."""
    if isinstance(data, dict) and "depths" in data:
        return SwinDims.from_dict(data, source=source)
    return Dims.from_dict(data, source=source)


def load_dims(path) -> Dims | SwinDims:
    """A dims file (YAML or JSON) of either family."""
    return dims_from_dict(Dims.read_file(path), source=f"dims file {path}")


def saved_timm_kwargs(ckpt: dict) -> dict:
    """The model kwargs a checkpoint records: a timm train.py checkpoint's `gp` (--gp, the
    pooling) and `model_kwargs` (--model-kwargs) in its args; a timm hub folder's
    `model_args` (but the frame, which the weights give)."""
    hub = ckpt.get("hub_config")
    if hub is not None and not is_our_architecture(hub["architecture"]):
        return {k: v for k, v in (hub.get("model_args") or {}).items()
                if k not in FRAME_FIELDS and k not in MODEL_KWARGS}
    args = ckpt.get("args")
    args = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, dict) else {}
    out = dict(args.get("model_kwargs") or {})
    if args.get("gp"):
        out["global_pool"] = args["gp"]
    return out


def _adapt_state_dict(sd: dict, model: ReViT) -> dict:
    """For finetuning at another size or label set: resample the position embedding and the
    token scales over the patch grid (as timm does), drop mismatched classifier heads."""
    sd = dict(sd)
    own = model.state_dict()
    grid = model.dims.img_size // model.dims.patch_size
    for key in own:
        if (key == "pos_embed" or key.endswith("attn.token_scale")) and key in sd \
                and sd[key].shape != own[key].shape:
            t = sd[key] if key == "pos_embed" else sd[key].reshape(1, -1, 1)
            prefix = model.dims.pos_embed_prefix if key == "pos_embed" else model.num_prefix_tokens
            t = resample_abs_pos_embed(t, (grid, grid), num_prefix_tokens=prefix)
            sd[key] = t.reshape(own[key].shape)
    for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            sd[key] = own[key]  # fresh classifier for the new label set
    return sd


def build_model(name: str, dims: Dims | SwinDims | None = None,
                checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
                adapt: bool = False, token_scale: bool = False, ema: bool = False,
                **kwargs) -> ReViT | ReSwin:
    """Build a ReViT, or a ReSwin for a Swin (a swin_* / swinv2_* name, SwinDims, or a Swin
    checkpoint: the checkpoint decides, then the dims, then the name).

    name: a timm ViT name (deit_*, deit3_*, vit_*, *_dinov2) or Swin name (swin_*,
        swinv2_*); fixes patch, image size, depth (for uniform dims), distillation and the
        family fields unless `dims`, the checkpoint or keyword arguments say otherwise.
    dims: per-block widths (and optionally frame) to use instead of the name's uniform ones.
    checkpoint: a timm/DeiT state dict file or URL (qkv split, dims inferred, strict),
        timm's or Microsoft's Swin weights, one of our checkpoints (dims read from it), or an
        NViT reference checkpoint (a released NViT model or a masked pruning checkpoint,
        converted exactly).
    pretrained: take timm's pretrained weights for `name` (needs the hub or its cache).
    adapt: allow the checkpoint's image size and classes to differ from the keyword
        arguments (position embedding or Swin bias tables resampled, classifier
        re-initialised), as finetuning on another data set needs; otherwise a mismatch is an
        error.
    token_scale: give a ViT a token scale (at 1, so the function is unchanged) if its dims or
        weights have none, as the NViT reference's pruning model has (a Swin has none).
    ema: take the checkpoint's weight EMA instead of its model weights.
    kwargs: frame fields (img_size, num_classes, patch_size, in_chans, distilled),
        drop_rate, attn_drop_rate, drop_path_rate, and timm's model kwargs for `name`
        (global_pool, fc_norm, class_token, reg_tokens, qkv_bias, init_values,
        no_embed_class, window_size, ...), which timm interprets; a timm train.py
        checkpoint's recorded --gp and --model-kwargs count as given, the explicit ones win.
    """
    frame, model_kwargs, timm_kwargs = _split_kwargs(dict(kwargs))
    ckpt = source = None
    if checkpoint is not None:
        source = str(checkpoint)
        ckpt = read_checkpoint(checkpoint)
        timm_kwargs = {**saved_timm_kwargs(ckpt), **timm_kwargs}
    elif pretrained:
        source = f"timm's pretrained {name}"
        ckpt = _timm_pretrained_state(name, timm_kwargs)
    swin = (_is_swin_checkpoint(ckpt) if ckpt is not None
            else isinstance(dims, SwinDims) or is_timm_swin_name(name))
    if swin:
        return _build_swin(name, dims, ckpt, source, adapt, ema, frame, model_kwargs, timm_kwargs)
    state = None
    if ckpt is not None:
        base = name_dims(name, **timm_kwargs)
        ck_dims, state = _checkpoint_dims(ckpt, base, source, ema)
        if dims is not None and _widths(dims) != _widths(ck_dims):
            raise UserError(f"{source} holds a model of other dims than the ones given "
                            f"(give none: the checkpoint's dims are used)", field="dims")
        if not adapt:
            _check_frame(ck_dims, frame, source)
        dims = ck_dims.with_family_defaults()  # a field a checkpoint lacks is DeiT's
    else:
        base = name_dims(name, **timm_kwargs)
        if isinstance(base, SwinDims):
            raise UserError(f"{name} is a Swin; its dims are SwinDims (stages)", field="dims")
    if dims is None:
        dims = base
    else:  # a spec by hand or by the ReViT rule: what it leaves open is the name's
        open_rope = dims.rope_dim is None
        dims = dims.with_frame(**{f: getattr(base, f) for f in (*FRAME_FIELDS, *FAMILY_FIELDS)
                                  if getattr(dims, f) is None})
        if open_rope and dims.rope_dim and len(set(dims.qk_dim)) == 1:
            dims = replace(dims, rope_dim=dims.qk_dim[0])  # timm's table: as wide as a head
    dims = dims.with_frame(**frame)
    if token_scale and not dims.token_scale:
        dims = replace(dims, token_scale=True)
    dims.validate()
    _check_fits_in_memory(dims)
    model = ReViT(dims, **model_kwargs)
    if state is not None:
        if adapt:
            state = _adapt_state_dict(state, model)
        if token_scale:  # the added scales start at 1
            state = {**{k: v for k, v in model.state_dict().items()
                        if k.endswith("attn.token_scale")}, **state}
        check_fits(model, state, source)
        model.load_state_dict(state)
    return model


def _check_frame(ck_dims, frame: dict, source: str) -> None:
    """Without `adapt`, the frame asked for must be the checkpoint's."""
    for key, value in frame.items():
        if key == "img_size" and isinstance(ck_dims, Dims) and not ck_dims.family("abs_pos_embed"):
            continue  # no weight depends on the grid (a RoPE ViT's table is computed)
        if value is not None and getattr(ck_dims, key) != value:
            hint = ("; it is a backbone without a classifier (as timm's DINOv2): "
                    "finetune it with a classifier on the data first, then prune that"
                    if key == "num_classes" and ck_dims.num_classes == 0 else "")
            raise UserError(f"{source} was made with {key}={getattr(ck_dims, key)}, but "
                            f"{key}={value} was asked for{hint}", field=key)


def _is_swin_checkpoint(ckpt: dict) -> bool:
    hub = ckpt.get("hub_config")
    if hub is not None:
        return hub["architecture"] == "reswin" or is_timm_swin_name(hub["architecture"])
    if isinstance(ckpt.get("dims"), dict):
        return "depths" in ckpt["dims"]
    try:
        return is_swin_state(state_dict_of(ckpt, "checkpoint"))
    except UserError:
        return False


def _build_swin(name: str, dims: SwinDims | None, ckpt: dict | None, source: str | None,
                adapt: bool, ema: bool, frame: dict, model_kwargs: dict,
                timm_kwargs: dict) -> ReSwin:
    frame = swin_frame(frame)
    base = name_dims(name, **timm_kwargs) if is_timm_swin_name(name) else None
    state = None
    if ckpt is not None:
        # a foreign state dict does not say its image size: the one asked for, else the name's
        seen = base.with_frame(img_size=frame.get("img_size")) if base is not None else None
        ck_dims, state = _swin_checkpoint_dims(ckpt, seen, source, ema)
        if dims is not None and _swin_widths(dims) != _swin_widths(ck_dims):
            raise UserError(f"{source} holds a model of other dims than the ones given "
                            f"(give none: the checkpoint's dims are used)", field="dims")
        if not adapt:
            _check_frame(ck_dims, frame, source)
        dims = ck_dims
    elif dims is None:
        if base is None:
            raise UserError(f"{name} is not a timm Swin name (e.g. swin_tiny_patch4_window7_224)",
                            field="name")
        dims = base
    else:  # a spec by hand: what it leaves open is the name's (Swin-T's for a ViT name)
        base = base if base is not None else name_dims("reswin")
        dims = dims.with_frame(**{f: getattr(base, f) for f in SWIN_FRAME
                                  if getattr(dims, f) is None})
    dims = dims.with_frame(**frame)
    dims.validate()
    _check_fits_in_memory(dims)
    model = ReSwin(dims, **model_kwargs)
    if state is not None:
        if adapt:
            state = adapt_swin_state(state, model)
        check_fits(model, state, source)
        model.load_state_dict(state)
    return model


def _swin_checkpoint_dims(ckpt: dict, base: SwinDims | None, source: str, ema: bool = False
                          ) -> tuple[SwinDims, dict]:
    """The SwinDims a checkpoint holds (or implies) and its weights in timm's layout."""
    state = state_dict_of(ckpt, source, ema)
    hub = ckpt.get("hub_config")
    if hub is not None and hub["architecture"] == "reswin":
        return SwinDims.from_dict(hub["model_args"]["dims"],
                                  source=f"model_args.dims in {source}"), state
    if isinstance(ckpt.get("dims"), dict):
        return SwinDims.from_dict(ckpt["dims"], source=f"dims in {source}"), state
    state = timm_layout(state)
    return swin_state_dims(state, base, source), state


def _swin_widths(d: SwinDims) -> tuple:
    return (d.embed_dim, d.depths, d.num_heads, d.qk_dim, d.v_dim, d.mlp_dim)


def parameter_count(dims: Dims | SwinDims) -> int:
    """Parameters of the model `dims` describes, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(dims)(dims).parameters())


def available_memory() -> int | None:
    """Bytes of memory the OS can still give this process (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits_in_memory(dims: Dims | SwinDims) -> None:
    """Refuse a model whose fp32 weights alone exceed the free memory, instead of letting
    the allocation take the machine down (--EMB 100000 asks for tens of GB)."""
    free = available_memory()
    if free is None:
        return
    n = parameter_count(dims)
    if 4 * n > free:
        raise UserError(f"these dims give {n:,} parameters ({4 * n / 2**30:.1f} GiB in fp32), "
                        f"more than the {free / 2**30:.1f} GiB of free memory", field="dims")


def _checkpoint_dims(ckpt: dict, base: Dims, source: str, ema: bool = False
                     ) -> tuple[Dims, dict]:
    """The dims a checkpoint holds (or implies) and its weights (or their EMA) in our layout."""
    state = state_dict_of(ckpt, source, ema)
    hub = ckpt.get("hub_config")
    if hub is not None and is_our_architecture(hub["architecture"]):  # our hub folder
        args = hub.get("model_args") or {}
        if "dims" in args:
            ck_dims = Dims.from_dict(args["dims"], source=f"model_args.dims in {source}")
        else:  # a registered ReViT name: its dims, in the frame the folder records
            frame = {k: v for k, v in args.items() if k in FRAME_FIELDS}
            ck_dims = name_dims(hub["architecture"]).with_frame(**frame)
        return ck_dims, state
    if is_reference_layout(state):  # an NViT reference model (released or masked)
        ck_dims, state = from_reference(ckpt, state, source)
        return ck_dims, fuse_split_qkv(state)
    if "dims" in ckpt:
        ck_dims = Dims.from_dict(ckpt["dims"], source=f"dims in {source}")
        if has_split_qkv(state):  # written before q, k and v were one tensor
            state = fuse_split_qkv(state)
        return ck_dims, state
    if is_timm_vit_state(state):
        return infer_uniform_dims(state, base, source), state
    raise UserError(f"{source} is neither a timm/DeiT state dict nor an nvit checkpoint "
                    f"(no fused qkv and no dims)")


def planned_img_size(name: str, dims: Dims | SwinDims | None = None,
                     checkpoint: str | os.PathLike | None = None, **timm_kwargs) -> int:
    """The image size build_model gives when none is asked for: the checkpoint's, else the
    dims spec's, else the name's. Lets a script size its data transforms before building the
    model; a local checkpoint is memory-mapped, not read."""
    if checkpoint is not None:
        ckpt = peek_checkpoint(checkpoint)
        kw = {**saved_timm_kwargs(ckpt), **timm_kwargs}
        if _is_swin_checkpoint(ckpt):
            base = name_dims(name, **kw) if is_timm_swin_name(name) else None
            return _swin_checkpoint_dims(ckpt, base, str(checkpoint))[0].img_size
        base = name_dims(name, **kw)
        return _checkpoint_dims(ckpt, base, str(checkpoint))[0].img_size or base.img_size
    base = name_dims(name, **timm_kwargs)
    if dims is not None and dims.img_size is not None:
        return dims.img_size
    return base.img_size


def _widths(d: Dims) -> tuple:
    return (d.embed_dim, d.num_heads, d.qk_dim, d.v_dim, d.mlp_dim)


def _timm_pretrained_state(name: str, timm_kwargs: dict) -> dict:
    problem = download_problem(name)
    if problem:
        raise UserError(f"timm cannot download the weights of {name}: {problem}; use a local "
                        f"file of them instead", field="pretrained")
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs).state_dict()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"timm could not get weights for {name} ({first[:120]}); without "
                        f"network access load a local file instead", field="pretrained") from None
