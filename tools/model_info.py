"""Per-block widths, parameters and MACs of a per-block-dims DeiT (ReViT / a pruned NViT) or
Swin (per stage: embedding width, tokens, window, patch merging).

    python -m tools.model_info --model deit_base_distilled_patch16_224 --EMB 176
    python -m tools.model_info --dims my_dims.yaml --input-size 32 --patch-size 8
    python -m tools.model_info --checkpoint OUT/pruned_checkpoint.pth --json
    python -m tools.model_info --model deit3_small_patch16_224
    python -m tools.model_info --model swin_tiny_patch4_window7_224
    python -m tools.model_info --families     # the supported timm ViT families

MACs are measured, not computed by formula: torch.utils.flop_counter.FlopCounterMode counts
the FLOPs of a batch-1 eval forward per module, and MACs = FLOPs / 2. Parameters of a block
are the sum of its parameters' sizes; "stem/head" is everything outside the blocks (patch
embedding, tokens, position embedding, final norm, classifier heads).
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import sys

import torch

from errors import UserError
from flags import POSITIVE_INT, Parser, user_message
from models.flops import count_macs

DEFAULT_MODEL = "deit_base_distilled_patch16_224"


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Per-block widths, parameters and MACs of a ReViT / NViT model.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"timm ViT or Swin name giving the frame, family and uniform dims "
                        f"(default {DEFAULT_MODEL}; see --families)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--EMB", type=POSITIVE_INT, default=None,
                     help="embedding width of the ReViT rule (e.g. 176 or 384)")
    src.add_argument("--dims", default=None, help="YAML/JSON dims spec file")
    src.add_argument("--checkpoint", default=None,
                     help="an nvit checkpoint (dims read from it) or a timm/DeiT state dict")
    p.add_argument("--input-size", type=POSITIVE_INT, default=None,
                   help="image size (default: the model's)")
    p.add_argument("--patch-size", type=POSITIVE_INT, default=None,
                   help="patch size (default: the model's)")
    p.add_argument("--num-classes", type=POSITIVE_INT, default=None,
                   help="classifier classes (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--families", action="store_true",
                   help="list the supported timm ViT families, one tested timm name each")
    return p


def families() -> list[dict]:
    """The supported families (models/timm_vit.py's table) with what each name's model has."""
    from models import name_dims
    from models.timm_vit import FAMILIES, FAMILY_KWARGS
    rows = []
    for family, name in FAMILIES.items():
        kwargs = FAMILY_KWARGS.get(family, {})
        d = name_dims(name, **kwargs)

        tokens = [t for t, on in (("cls", d.class_token), ("dist", d.distilled)) if on]
        if d.reg_tokens:
            tokens.append(f"{d.reg_tokens} reg")
        rows.append({"family": family, "name": name,
                     "model_kwargs": " ".join(f"{k}={v}" for k, v in kwargs.items()),
                     "tokens": " + ".join(tokens) or "none",
                     "layer_scale": d.layer_scale,
                     "qkv_bias": "q, v" if d.qkv_bias and not d.family("k_bias") else d.qkv_bias,
                     "pos_embed": ("rotary only" if not d.family("abs_pos_embed") else
                                   ("patches" if d.no_embed_class else "all tokens")
                                   + (" + rotary" if d.family("rope_dim") else "")),
                     "pool": d.global_pool + (" + fc_norm" if d.fc_norm else ""),
                     "patch": d.patch_size, "img": d.img_size,
                     "norms": ("norm_pre, " if d.pre_norm else "") + ("qk-norm, " if d.qk_norm
                                                                       else "")
                     + f"eps {d.ln_eps:g}",
                     "act": d.mlp_act})
    return rows


def format_families(rows: list[dict]) -> str:
    cols = [("family", "family"), ("name", "example timm name"), ("tokens", "prefix tokens"),
            ("layer_scale", "LayerScale"), ("qkv_bias", "qkv bias"), ("pos_embed", "pos. embed"),
            ("pool", "pooling"), ("norms", "LayerNorms"), ("act", "MLP act."), ("patch", "patch"),
            ("img", "image")]
    def cell(r, k):
        v = r[k]
        if k == "layer_scale":
            return f"{v:g}" if v else "no"
        if k == "qkv_bias" and isinstance(v, bool):
            return "yes" if v else "no"
        if k == "name" and r["model_kwargs"]:
            return f"{v} --model-kwargs {r['model_kwargs']}"
        return str(v)
    width = {k: max(len(h), *(len(cell(r, k)) for r in rows)) for k, h in cols}
    lines = ["  ".join(h.ljust(width[k]) for k, h in cols)]
    lines.append("  ".join("-" * width[k] for k, _ in cols))
    lines += ["  ".join(cell(r, k).ljust(width[k]) for k, _ in cols) for r in rows]
    return "\n".join(lines)


def build_from_args(args: argparse.Namespace) -> torch.nn.Module:
    import models

    frame = {}
    for flag, key in (("input_size", "img_size"), ("patch_size", "patch_size"),
                      ("num_classes", "num_classes")):
        value = getattr(args, flag)
        if value is not None:
            frame[key] = value
    if args.EMB is not None:
        return models.build_model(args.model, dims=models.revit_dims(args.EMB), **frame)
    if args.dims is not None:
        return models.build_model(args.model, dims=models.load_dims(args.dims), **frame)
    if args.checkpoint is not None:
        return models.build_model(args.model, checkpoint=args.checkpoint, **frame)
    return models.build_model(args.model, **frame)


def _block_modules(model: torch.nn.Module) -> list[tuple[str, int | None, torch.nn.Module]]:
    """(module path, stage or None, block) of every block in order: a ViT's `blocks.i`, a
    Swin's `layers.s.blocks.j`."""
    if hasattr(model, "layers"):
        return [(f"layers.{s}.blocks.{j}", s, blk) for s, stage in enumerate(model.layers)
                for j, blk in enumerate(stage.blocks)]
    return [(f"blocks.{i}", None, blk) for i, blk in enumerate(model.blocks)]


@torch.no_grad()
def model_info(model: torch.nn.Module) -> dict:
    """Widths, parameters and measured MACs per block (a Swin's per stage, with its patch
    merging and window), for the stem/head and in total."""
    d = model.dims
    prefix = type(model).__name__
    total_macs, per_module = count_macs(model)  # torch's counter plus the CPU attention kernel
    total_params = sum(p.numel() for p in model.parameters())
    blocks = []
    for i, (path, stage, blk) in enumerate(_block_modules(model)):
        row = {"index": i, "num_heads": d.num_heads[i], "qk_dim": d.qk_dim[i],
               "v_dim": d.v_dim[i], "mlp_dim": d.mlp_dim[i], "attn_scale": d.attn_scale[i],
               "params": sum(p.numel() for p in blk.parameters()),
               "macs": per_module.get(f"{prefix}.{path}", 0.0)}
        if stage is not None:
            row.update(stage=stage, embed_dim=d.embed_dim[stage], window=blk.window,
                       shift=blk.shift, tokens=d.grid(stage) ** 2)
        blocks.append(row)
    block_params = sum(b["params"] for b in blocks)
    block_macs = sum(b["macs"] for b in blocks)
    swin = hasattr(model, "layers")
    info = {
        "params": total_params,
        "macs": total_macs,
        "gmacs": total_macs / 1e9,
        "stem_head": {"params": total_params - block_params, "macs": total_macs - block_macs},
        "embed_dim": d.embed_dim,
        "depth": d.depth,
        "img_size": d.img_size,
        "patch_size": d.patch_size,
        "num_classes": d.num_classes,
        "init": d.init,
        "pool": d.global_pool + (" + fc_norm" if getattr(d, "fc_norm", False) else ""),
        "dims": d.to_dict(),
        "blocks": blocks,
    }
    if swin:
        info.update(version=d.version, depths=d.depths, tokens=[d.grid(s) ** 2 for s in
                                                                range(d.num_stages)])
        info["merges"] = [{"stage": s, "params": sum(p.numel() for p in st.downsample.parameters()),
                           "macs": per_module.get(f"{prefix}.layers.{s}.downsample", 0.0)}
                          for s, st in enumerate(model.layers) if s > 0]
    else:
        info.update(tokens=d.num_tokens, distilled=bool(d.distilled),
                    token_scale=bool(d.token_scale), prefix_tokens=d.num_prefix_tokens,
                    layer_scale=d.layer_scale)
    return info


def format_table(info: dict) -> str:
    swin = "merges" in info
    lead = f"{'stage':>5} {'emb':>5} {'tokens':>6} {'window':>6} " if swin else ""
    header = f"{lead}{'block':>5} {'heads':>5} {'QK/head':>7} {'V/head':>6} {'MLP':>6} " \
             f"{'scale':>8} {'params':>12} {'MMACs':>10}"
    width = len(header) - 24
    lines = [header, "-" * len(header)]
    merges = {m["stage"]: m for m in info.get("merges", [])}
    for b in info["blocks"]:
        if swin and b["stage"] in merges and b["index"] == sum(info["depths"][:b["stage"]]):
            m = merges[b["stage"]]
            lines.append(f"{b['stage']:>5} {'patch merging':<{width - 6}} {m['params']:>12,} "
                         f"{m['macs'] / 1e6:>10.2f}")
        win = f"{b['window']}{'s' if b['shift'] else ''}" if swin else ""
        lead = (f"{b['stage']:>5} {b['embed_dim']:>5} {b['tokens']:>6} {win:>6} " if swin else "")
        lines.append(f"{lead}{b['index']:>5} {b['num_heads']:>5} {b['qk_dim']:>7} {b['v_dim']:>6} "
                     f"{b['mlp_dim']:>6} {b['attn_scale']:>8.4f} {b['params']:>12,} "
                     f"{b['macs'] / 1e6:>10.2f}")
    sh = info["stem_head"]
    if swin:  # the merges' rows are shown above; stem/head is the rest
        sh = {k: sh[k] - sum(m[k] for m in merges.values()) for k in ("params", "macs")}
    lines.append(f"{'stem/head':<{width}} {sh['params']:>12,} {sh['macs'] / 1e6:>10.2f}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}} {info['params']:>12,} {info['macs'] / 1e6:>10.2f}")
    lines.append("")
    lines.append(f"params {info['params']:,} ({info['params'] / 1e6:.2f} M)   "
                 f"MACs {info['gmacs']:.3f} G ({info['macs'] / 1e6:.2f} M)")
    if swin:
        lines.append(f"Swin v{info['version']}   embed dims {info['embed_dim']}   depths "
                     f"{info['depths']}   tokens {info['tokens']}   image size {info['img_size']}   "
                     f"patch size {info['patch_size']}   classes {info['num_classes']}   "
                     f"pooling {info['pool'] or 'none'}   (window Ns: shifted by N/2)")
        return "\n".join(lines)
    lines.append(f"embed dim {info['embed_dim']}   depth {info['depth']}   tokens {info['tokens']}   "
                 f"image size {info['img_size']}   patch size {info['patch_size']}   "
                 f"classes {info['num_classes']}   distilled {'yes' if info['distilled'] else 'no'}   "
                 f"token scale {'yes' if info['token_scale'] else 'no'}   init {info['init']}")
    lines.append(f"prefix tokens {info['prefix_tokens']}   LayerScale "
                 f"{info['layer_scale'] or 'no'}   pooling {info['pool']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.families:
        rows = families()
        print(json.dumps(rows) if args.json else format_families(rows))
        return 0
    try:
        info = model_info(build_from_args(args))
    except UserError as e:
        sys.stderr.write(f"error: {user_message(e)}\n")
        return 2
    print(json.dumps(info) if args.json else format_table(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
