"""Reading model weights: our checkpoints (which carry dims) and foreign timm/DeiT state dicts.

timm, DeiT and our model store one `qkv` projection per block (rows Q | K | V), so timm
weights load as they are. Our checkpoints written before the projection was one tensor
(and the NViT reference's, once converted) hold `attn.q`, `attn.k` and `attn.v`; those are
stacked on the way in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import torch

from errors import UserError

from .dims import Dims

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
# The only class a checkpoint may hold besides tensors and plain values: the NViT reference
# (and DeiT) store their argparse arguments under "args".
SAFE_GLOBALS = [argparse.Namespace]


def _refusal(path: str, e: Exception) -> str | None:
    """The message for a file that holds a pickled object we do not unpickle, else None."""
    found = _UNSUPPORTED_GLOBAL.search(str(e))
    if not found:
        return None
    return (f"{path} holds a pickled {found.group(1)}, which is not loaded (checkpoints may hold "
            f"tensors, plain values and argparse.Namespace only; nothing in it was executed)")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file or URL into a dict, with one clear message for every failure.

    torch.load runs with weights_only=True: no class outside SAFE_GLOBALS is ever built.
    """
    path = str(path)
    if path.startswith(("http://", "https://")):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.hub.load_state_dict_from_url(path, map_location="cpu",
                                                          check_hash=False, weights_only=True)
        except Exception as e:
            raise UserError(_refusal(path, e) or
                            f"could not fetch checkpoint {path}: {str(e).splitlines()[0]}") from None
    if os.path.isdir(path):
        if is_hub_folder(path):
            return read_hub_folder(path)
        raise UserError(f"{path} is a folder, not a checkpoint file (give the .pth or "
                        f".safetensors file in it, or a timm/Hugging Face hub folder with "
                        f"config.json)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise UserError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
        ckpt = {"model": state}
        if "dims" in meta:
            ckpt["dims"] = json.loads(meta["dims"])
        return ckpt
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(_refusal(path, e) or f"{path} is not a readable PyTorch checkpoint "
                        f"(corrupt or truncated? {type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a state dict or checkpoint dict")
    return ckpt


HUB_CONFIG = "config.json"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's names, preferred first


def is_hub_folder(path: str | os.PathLike) -> bool:
    """A timm / Hugging Face hub folder: config.json beside the weights."""
    return os.path.isfile(os.path.join(path, HUB_CONFIG))


def read_hub_folder(path: str | os.PathLike) -> dict:
    """A hub folder as a checkpoint dict: its weights, and its config under "hub_config"
    (architecture, model_args; build_model reads our architectures' dims from it)."""
    path = str(path)
    try:
        with open(os.path.join(path, HUB_CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/{HUB_CONFIG} is not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise UserError(f"{path}/{HUB_CONFIG} names no architecture: not a timm hub folder")
    weights = next((os.path.join(path, w) for w in HUB_WEIGHTS
                    if os.path.isfile(os.path.join(path, w))), None)
    if weights is None:
        raise UserError(f"{path} holds a {HUB_CONFIG} but no weights ({' or '.join(HUB_WEIGHTS)})")
    ckpt = read_checkpoint(weights)
    return {"model": state_dict_of(ckpt, weights), "hub_config": config}


def peek_checkpoint(path: str | os.PathLike) -> dict:
    """read_checkpoint, but a local PyTorch file is memory-mapped: only what is looked at is
    read. For looking, not for training state (the tensors share the file's pages)."""
    path = str(path)
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(ckpt, dict):
                return ckpt
        except Exception:  # an old-format or broken file: read_checkpoint says what is wrong
            pass
    return read_checkpoint(path)


EMA_KEYS = ("model_ema", "state_dict_ema")  # ours and DeiT's; timm's train.py


def state_dict_of(ckpt: dict, source: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint dict (with `ema`, the weight EMA kept beside
    them), with DDP's `module.` prefix removed."""
    if ema:
        sd = next((ckpt[k] for k in EMA_KEYS if isinstance(ckpt.get(k), dict)), None)
        if sd is None:
            raise UserError(f"{source} holds no EMA weights (none of {', '.join(EMA_KEYS)}; "
                            f"saved without a weight EMA?)", field="ema")
    else:
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                sd = ckpt[key]
                break
        else:
            sd = ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{source} holds no model weights (expected a state dict of tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def is_timm_vit_state(sd: dict) -> bool:
    """A timm ViT's state dict: fused qkv, or (timm's qkv_fused=False) its q_proj."""
    return any(k.endswith(("attn.qkv.weight", "attn.q_proj.weight")) for k in sd)


def fuse_split_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate `attn.q`, `attn.k`, `attn.v` entries -> one `attn.qkv` (rows [q; k; v])."""
    out = {}
    for key, value in sd.items():
        if ".attn.q." in key:
            prefix, suffix = key.split(".attn.q.")
            parts = [sd[f"{prefix}.attn.{n}.{suffix}"] for n in "qkv"]
            out[f"{prefix}.attn.qkv.{suffix}"] = torch.cat(parts, dim=0)
        elif ".attn.k." not in key and ".attn.v." not in key:
            out[key] = value
    return out


def has_split_qkv(sd: dict) -> bool:
    return any(".attn.q." in k for k in sd)


# family fields the tensors cannot tell: the model name's (the rotary table has no weights)
NAME_ONLY_FIELDS = ("layout", "rope_temperature", "rope_grid_indexing", "rope_ref_grid",
                    "rope_half")


def infer_uniform_dims(sd: dict[str, torch.Tensor], base: Dims, source: str) -> Dims:
    """Dims of a timm ViT/DeiT state dict. Widths, depth, image and patch size and which
    tokens, LayerScale, biases and norms it has are read from the tensors; what shapes
    cannot tell (heads, pooling, LayerScale's initial value, whether the position embedding
    covers the prefix tokens when both readings fit) is the model name's (`base`)."""
    try:
        embed = sd["patch_embed.proj.weight"].shape[0]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
        w = sd["patch_embed.proj.weight"]
        fused = "blocks.0.attn.qkv.weight" in sd  # else timm's q_proj, k_proj, v_proj
        qkv_out = (sd["blocks.0.attn.qkv.weight"].shape[0] // 3 if fused
                   else sd["blocks.0.attn.q_proj.weight"].shape[0])
        split_glu = "blocks.0.mlp.fc1_g.weight" in sd  # timm's SwiGLU: gate, value layers
        mlp = sd["blocks.0.mlp.fc1_g.weight" if split_glu else "blocks.0.mlp.fc1.weight"].shape[0]
        # a RoPE ViT has no position embedding: its grid is the name's
        tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    except (KeyError, ValueError) as e:
        raise UserError(f"{source} is not a ViT/DeiT state dict (missing {e})") from None
    num_heads = base.num_heads[0]
    if base.family("mlp_act") == "swiglu_packed":
        mlp //= 2  # fc1 holds each unit's gate and value rows
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    distilled = "dist_token" in sd
    prefix = ("cls_token" in sd) + distilled + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    def patches(no_embed: bool) -> int:  # the grid the position embedding covers
        return tokens - (0 if no_embed else prefix)
    if tokens is None and base.family("abs_pos_embed"):
        raise UserError(f"{source} is not a ViT/DeiT state dict (missing 'pos_embed')")
    if tokens is None:  # any grid: the rotary table is computed, not learned
        no_embed_class, side = base.family("no_embed_class"), base.img_size // w.shape[-1]
    else:
        readings = [no_embed for no_embed in (base.family("no_embed_class"),
                                              not base.family("no_embed_class"))
                    if patches(no_embed) > 0
                    and math.isqrt(patches(no_embed)) ** 2 == patches(no_embed)]
        if not readings:
            raise UserError(f"{source}: position embedding of {tokens} tokens is not a square "
                            f"grid (with or without its {prefix} prefix tokens)")
        no_embed_class = readings[0]
        side = math.isqrt(tokens - (0 if no_embed_class else prefix))
    if qkv_out % num_heads:
        raise UserError(f"{source}: QKV width {qkv_out} is not divisible by {num_heads} heads "
                        f"(does the model name match the checkpoint?)", field="name")
    gammas = "blocks.0.ls1.gamma" in sd or "blocks.0.gamma_1" in sd  # timm's ViT, Eva
    layer_scale = (base.family("layer_scale") or 1e-5) if gammas else 0.0
    eva_bias = "blocks.0.attn.q_bias" in sd  # Eva's attention: Q and V biases, no K bias
    if fused:
        qkv_bias, k_bias = "blocks.0.attn.qkv.bias" in sd or eva_bias, not eva_bias
    else:
        qkv_bias = "blocks.0.attn.q_proj.bias" in sd
        k_bias = "blocks.0.attn.k_proj.bias" in sd or not qkv_bias
    fc_norm = "fc_norm.weight" in sd
    global_pool = base.family("global_pool") if "cls_token" in sd else "avg"
    pool = {}
    if "attn_pool.latent" in sd:  # SigLIP's attention pool: widths from its tensors
        global_pool = "map"
        pool = dict(pool_dim=sd["attn_pool.q.weight"].shape[0],
                    pool_heads=base.pool_heads or num_heads,
                    pool_mlp_dim=sd["attn_pool.mlp.fc1.weight"].shape[0])
    if "cls_token" in sd and fc_norm != base.family("fc_norm"):
        # timm puts fc_norm after average pooling by default: the tensors suggest a pooling
        # the name does not have, and they cannot tell which one it was
        raise UserError(
            f"{source} has {'an' if fc_norm else 'no'} fc_norm and a class token, unlike the "
            f"model name's {base.family('global_pool')!r} pooling, and the tensors cannot tell "
            f"how it pooled; say how it was trained: global_pool='avg' or 'token', and fc_norm",
            field="global_pool")
    return Dims.uniform(embed, depth, num_heads, mlp, qk_dim=qkv_out // num_heads,
                        img_size=side * w.shape[-1], patch_size=w.shape[-1], in_chans=w.shape[1],
                        num_classes=num_classes, distilled=distilled,
                        class_token="cls_token" in sd,
                        reg_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
                        layer_scale=layer_scale,
                        qkv_bias=qkv_bias, k_bias=k_bias, qkv_fused=fused,
                        mlp_norm="blocks.0.mlp.norm.weight" in sd,
                        attn_norm="blocks.0.attn.norm.weight" in sd,
                        abs_pos_embed=tokens is not None,
                        **{f: base.family(f) for f in NAME_ONLY_FIELDS},
                        # timm's rotary table is as wide as a head
                        rope_dim=qkv_out // num_heads if base.family("rope_dim") else 0,
                        no_embed_class=no_embed_class, global_pool=global_pool,
                        fc_norm=fc_norm, pre_norm="norm_pre.weight" in sd,
                        ln_eps=base.family("ln_eps"),
                        mlp_act="swiglu" if split_glu else base.family("mlp_act"),
                        qk_norm="blocks.0.attn.q_norm.weight" in sd, **pool)


def check_fits(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with one readable message instead of PyTorch's multi-line error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(f"{len(wrong)} of another shape (e.g. {k}: "
                        f"{tuple(sd[k].shape)} in file, {tuple(own[k].shape)} in model)")
    if problems:
        raise UserError(f"{source} does not fit the model: " + "; ".join(problems))
