"""Measure a latency lookup table for `--cost latency` on this machine's CPU or GPU.

Times the attention part (LayerNorm, q/k/v projections, SDPA, output projection, residual
add; the model's own `Attention`) over a grid of (embed, heads, QK per head, V per head)
and the MLP part (LayerNorm, fc1, GELU, fc2, residual add; the model's own `Mlp`) over
(embed, MLP width), in eval mode under torch.inference_mode, as the median of repeated
runs after warm-up; the attention multiplies q, k and v by a per-token scale as the pruning
student does (--token-scale false: without). With --model the grid spans the model's widths
down to one pruning group per axis, and the stem (patch embedding, tokens, final norm,
heads) is timed per embed width too. The JSON format is described in pruning/cost.py
(LatencyTable).

Time where and as you deploy: on CUDA the defaults are batch 256 under fp16 autocast (what
nvit_prune.py --amp runs), timed with CUDA events over queued forwards; on the CPU batch 1
in fp32. --runtime onnxruntime times every sublayer exported to ONNX in ONNX Runtime (this
process's threads), as a model exported by tools.export runs (pruning/runtimes.py). The
table records device, versions, runtime, batch, precision and token count, which
nvit_prune.py compares with its run.

    python -m tools.build_latency_table --output latency.json
    python -m tools.build_latency_table --output latency.json --model deit_small_patch16_224
    python -m tools.build_latency_table --output swin.json --model swin_tiny_patch4_window7_224
    python -m tools.build_latency_table --output latency_ort.json --model deit_small_patch16_224 \
        --runtime onnxruntime --batch-size 32
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from atomic import check_output_file, write_text_atomic
from errors import UserError
from engine import amp_dtype_for
from flags import (COUNT, POSITIVE_INT, Parser, add_amp_dtype_arg, add_runtime_arg,
                   add_tf32_arg, str2bool, user_message)
from models.dims import BLOCK_LISTS as BLOCK_AXES, Dims
from models.factory import name_dims
from models.swin_dims import SwinDims
from pruning import DEFAULT_GROUP_SIZES
from pruning.cost import LatencyTable, precision_name
from pruning.cost_swin import SwinLatencyTable
from pruning.latency import measure_table
from pruning.latency_swin import measure_swin_table
from pruning.runtimes import deploy_dtype
from utils import configure_math, resolve_device

DEFAULT_BATCH = {"cuda": 256, "cpu": 1}
DEFAULTS = {  # small: about a minute on 2 CPU cores at 198 tokens
    "embed_dims": "192,384,768", "heads": "1,2,4,8,12", "qk_dims": "8,16,32,64",
    "v_dims": "8,16,32,64", "mlp_dims": "192,768,1536,3072",
}


# ------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSON file to write (folders are created)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help=f"images per forward (default {DEFAULT_BATCH['cuda']} on CUDA, the "
                        f"NViT paper's V100 batch; {DEFAULT_BATCH['cpu']} on the CPU): the "
                        f"batch you deploy with")
    p.add_argument("--num-tokens", type=POSITIVE_INT, default=None,
                   help="tokens per image (default: the --model's, else 198 = DeiT at 224 px "
                        "with class and distillation tokens)")
    p.add_argument("--model", default=None,
                   help="timm DeiT/ViT or Swin name: grid around its widths, its token count, "
                        "and the stem timed too (a Swin: each stage at its tokens and window)")
    p.add_argument("--checkpoint", default=None,
                   help="as --model, with the dims of the model in this checkpoint (a pruning "
                        "run's --pretrained-path, a dims-file model, a hub folder)")
    p.add_argument("--input-size", type=POSITIVE_INT, default=None,
                   help="with --model or --checkpoint: the image size the model runs at (default the name's), "
                        "which sets its token count and the stem")
    p.add_argument("--patch-size", type=POSITIVE_INT, default=None,
                   help="with --model: its patch size (default the name's)")
    for flag, key in (("--embed-dims", "embed_dims"), ("--heads", "heads"),
                      ("--qk-dims", "qk_dims"), ("--v-dims", "v_dims"),
                      ("--mlp-dims", "mlp_dims")):
        p.add_argument(flag, default=None,
                       help=f"comma-separated widths (default {DEFAULTS[key]}, or derived "
                            f"from --model)")
    p.add_argument("--warmup", type=COUNT, default=5)
    p.add_argument("--repeats", type=POSITIVE_INT, default=20)
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads for torch (default: torch's choice); time with the "
                        "thread count you will deploy with, on an otherwise idle machine")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="time under autocast, float16 on CUDA and bfloat16 on the CPU (default: "
                        "on for CUDA, as nvit_prune.py --amp runs; off on the CPU)")
    p.add_argument("--token-scale", default=True, type=str2bool,
                   help="time the attention with the per-token scale on q, k and v that "
                        "nvit_prune.py gives its student by default (--token_scale); false for "
                        "a run with --token_scale false")
    add_runtime_arg(p, "time the sublayers in this runtime: torch, torch.compile, ONNX Runtime "
                       "(exported to ONNX, this process's threads), or TensorRT through ONNX "
                       "Runtime; recorded in the table, which nvit_prune.py --runtime checks")
    add_amp_dtype_arg(p)
    add_tf32_arg(p)
    return p.parse_args(argv)


def parse_widths(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}") \
            from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def _fractions(full: int, fracs: tuple[float, ...], floor: int = 1, multiple: int = 1,
               smallest: int | None = None) -> str:
    vals = {max(floor, int(round(full * f / multiple)) * multiple) for f in fracs}
    if smallest is not None and smallest < full:
        vals.add(smallest)
    return ",".join(str(v) for v in sorted(vals | {full}))


def width_grid(E: int, H: int, QK: int, V: int, M: int) -> dict[str, str]:
    """Grid strings around these widths, each axis reaching the width and down to one
    pruning group (the narrowest layer a run can leave; below a grid's first point a table
    is flat, so pruning there would look free)."""
    g = DEFAULT_GROUP_SIZES
    return {
        "embed_dims": _fractions(E, (0.25, 0.5, 0.75), floor=8, multiple=8, smallest=g["emb"]),
        "heads": _fractions(H, (0.0, 0.25, 0.5, 0.75)),
        "qk_dims": _fractions(QK, (0.125, 0.25, 0.5), floor=min(8, QK), smallest=g["qk"]),
        "v_dims": _fractions(V, (0.125, 0.25, 0.5), floor=min(8, V), smallest=g["v"]),
        "mlp_dims": _fractions(M, (1 / 16, 0.25, 0.5, 0.75), floor=8, multiple=8,
                               smallest=g["mlp"]),
    }


def model_grid(d: Dims) -> dict[str, str]:
    """A ViT's grid: around its embedding and its widest block on each axis."""
    return width_grid(d.embed_dim, *(max(getattr(d, n)) for n in BLOCK_AXES))


def stage_grids(d: SwinDims) -> list[dict[str, str]]:
    """A Swin's grids, one per stage: around the stage's width and its widest block."""
    return [width_grid(d.embed_dim[s], *(max(getattr(d, n)[i] for i in d.stage_blocks(s))
                                         for n in BLOCK_AXES))
            for s in range(d.num_stages)]


def model_dims(args: argparse.Namespace) -> Dims | SwinDims | None:
    """The dims of --model (at --input-size / --patch-size) or of --checkpoint's model."""
    frame = {k: v for k, v in (("img_size", args.input_size),
                               ("patch_size", args.patch_size)) if v is not None}
    if args.checkpoint is not None:
        import models
        return models.build_model(args.model or "revit", checkpoint=args.checkpoint,
                                  adapt=bool(frame), **frame).dims
    if args.model is not None:
        return name_dims(args.model, **frame)
    if frame:
        raise UserError("--input-size and --patch-size set the frame of --model: name the "
                        "model too (or give --num-tokens)")
    return None


def write_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def run(args: argparse.Namespace) -> None:
    output = check_output_file(args.output, "--output", args.force)
    device = resolve_device(args.device)
    configure_math(device, args.tf32)  # as the pruning run: cudnn.benchmark, TF32 if asked
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH[device.type]
    default_amp = device.type == "cuda" and deploy_dtype(args.runtime, True) is not None
    amp_dtype = amp_dtype_for(device, args.amp if args.amp is not None else default_amp,
                              args.amp_dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dims = model_dims(args)
    if isinstance(dims, SwinDims):
        run_swin(args, output, device, amp_dtype, dims)
        return
    defaults = model_grid(dims) if dims is not None else dict(DEFAULTS)
    num_tokens = args.num_tokens or (dims.num_tokens if dims is not None else 198)
    grid = {}
    for key in DEFAULTS:
        given = getattr(args, key)
        grid[key] = parse_widths(given if given is not None else defaults[key],
                                 "--" + key.replace("_", "-"))

    n_att = math.prod(len(grid[k]) for k in ("embed_dims", "heads", "qk_dims", "v_dims"))
    print(f"timing {n_att} attention and {len(grid['embed_dims']) * len(grid['mlp_dims'])} MLP "
          f"configurations on {device} (batch {args.batch_size}, {num_tokens} tokens, "
          f"{precision_name(amp_dtype)}, {torch.get_num_threads()} threads, in {args.runtime})",
          flush=True)
    t0 = time.perf_counter()
    data = measure_table(grid, device, args.batch_size, num_tokens, args.warmup, args.repeats,
                         amp_dtype, dims, args.model, args.token_scale, args.runtime)
    table = LatencyTable.from_dict(data)  # the table must read back before it is written
    write_atomic(output, data)

    E, H, Q, V, M = (grid[k][-1] for k in ("embed_dims", "heads", "qk_dims", "v_dims",
                                            "mlp_dims"))
    print(f"wrote {output} in {time.perf_counter() - t0:.1f} s; at the grid's top "
          f"(embed {E}, {H} heads, qk {Q}, v {V}, mlp {M}) a block takes "
          f"{table.block(E, H, Q, V, M):.3f} ms (attention {table.attention(E, H, Q, V):.3f}, "
          f"MLP {table.mlp(E, M):.3f})")
    lowered_note(sum(g.lowered for g in table.parts.values()))
    if dims is not None:
        print(f"{args.model}: estimated {table.total(dims):.2f} ms per batch of "
              f"{args.batch_size} (stem {table.stem(dims, dims.embed_dim):.3f} ms)")


def run_swin(args: argparse.Namespace, output: Path, device: torch.device, amp_dtype,
             dims: SwinDims) -> None:
    """A Swin's table: each stage timed at its own tokens and window, over a grid around the
    stage's widths (the per-axis width flags describe one ViT grid and are refused here)."""
    given = [k for k in DEFAULTS if getattr(args, k) is not None] + (
        ["num_tokens"] if args.num_tokens is not None else [])
    if given:
        raise UserError(f"--{given[0].replace('_', '-')}: a Swin's table is timed per stage on "
                        f"a grid around each stage's widths and at its own tokens; give the "
                        f"model only", field=given[0])
    grids = [{k: parse_widths(v, k) for k, v in g.items()} for g in stage_grids(dims)]
    print(f"timing a Swin v{dims.version} of {dims.num_stages} stages on {device} (batch "
          f"{args.batch_size}, {precision_name(amp_dtype)}, {torch.get_num_threads()} threads, "
          f"in {args.runtime})", flush=True)
    t0 = time.perf_counter()
    data = measure_swin_table(grids, dims, device, args.batch_size, args.warmup, args.repeats,
                              amp_dtype, args.model or args.checkpoint, args.runtime)
    table = SwinLatencyTable.from_dict(data).bind(dims)  # must read back before it is written
    write_atomic(output, data)
    print(f"wrote {output} in {time.perf_counter() - t0:.1f} s; the model: estimated "
          f"{table.total(dims):.2f} ms per batch of {args.batch_size} (stem, merges and head "
          f"{table.stem(dims):.3f} ms)")
    lowered_note(table.lowered)


def lowered_note(lowered: int) -> None:
    if lowered:
        print(f"note: {lowered} measured point(s) were slower than a wider configuration and "
              f"are read as that one's time (timing noise, is the machine busy? or, on CUDA, a "
              f"kernel or alignment the narrower shape does not reach)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
