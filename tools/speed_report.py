"""Promised against delivered: how much faster a pruned model runs than the model it came from.

    python -m tools.speed_report OUT/pruned_checkpoint.pth [--device cuda] [--batch-size 256] [--amp]
    python -m tools.speed_report COMPACT.pth --dense deit_base_distilled_patch16_224

Times the dense and the compact model (eval forward under torch.inference_mode, the timing of
tools/build_latency_table.py: wall clock on the CPU, CUDA events on a GPU) in interleaved
pairs after warm-up, and prints the median speedup of the pairs (p25-p75) beside what was
promised: the MACs ratio and, with --latency-table (or the run's own cost when it was a
latency table), the table's prediction. Fewer MACs do not always mean faster: small matrix
products, unequal attention widths and fixed per-layer costs keep a compact model from its
MACs ratio; a warning says so when the measured speedup falls well short of it. The dense
model is rebuilt from the checkpoint's `original_dims` (weights do not change the timing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from checkpoints import is_url
from engine import amp_dtype_for
from errors import UserError
from flags import POSITIVE_INT, Parser, add_amp_dtype_arg, user_message
from models import Dims, ReViT, build_model, read_checkpoint
from models.flops import count_macs
from pruning.cost import LatencyTable, precision_name
from pruning.latency import Timer
from tools.build_latency_table import resolve_device

SHORT_OF_MACS = 0.8  # warn below this fraction of the speedup the MACs ratio promises


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Measured speedup of a pruned model against its MACs and latency-table promise.")
    p.add_argument("checkpoint", help="pruned_checkpoint.pth of nvit_prune.py (or any compact "
                                      "model file, with --dense)")
    p.add_argument("--dense", default=None,
                   help="the model it was pruned from: a timm DeiT name or a checkpoint "
                        "(default: the checkpoint's original_dims)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help="images per forward (default 256 on CUDA, 1 on the CPU)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on the CPU")
    add_amp_dtype_arg(p)
    p.add_argument("--pairs", type=POSITIVE_INT, default=20, help="interleaved timing pairs")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5,
                   help="forwards per model per pair (their median is the pair's time)")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="CPU threads for torch")
    p.add_argument("--latency-table", default=None, help="a latency table to compare with")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def dense_of(args, ckpt: dict, compact: ReViT) -> ReViT:
    if args.dense is not None:
        if Path(args.dense).exists() or is_url(args.dense):
            return build_model("deit_base_patch16_224", checkpoint=args.dense)
        d = compact.dims  # a timm name in the compact model's frame
        return build_model(args.dense, img_size=d.img_size, patch_size=d.patch_size,
                           num_classes=d.num_classes)
    if not isinstance(ckpt.get("original_dims"), dict):
        raise UserError(f"{args.checkpoint} holds no original_dims (not a pruned_checkpoint.pth "
                        f"of nvit_prune.py); name the model it came from with --dense")
    return ReViT(Dims.from_dict(ckpt["original_dims"], source=f"original_dims in {args.checkpoint}"))


def speed_report(dense: ReViT, compact: ReViT, device: torch.device, batch: int,
                 amp_dtype, pairs: int, repeats: int, table: LatencyTable | None = None) -> dict:
    """Measured and promised speedups of `compact` over `dense` (see the module docstring)."""
    macs_ratio = count_macs(compact)[0] / count_macs(dense)[0]
    d = dense.dims
    x = torch.randn(batch, d.in_chans, d.img_size, d.img_size, device=device)
    timer = Timer(device, warmup=2, repeats=repeats, amp_dtype=amp_dtype)
    times = {"dense": [], "compact": []}
    for _ in range(pairs):
        times["dense"].append(timer(dense, x))
        times["compact"].append(timer(compact, x))
    ratios = sorted(a / b for a, b in zip(times["dense"], times["compact"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    report = {"device": str(device), "batch_size": batch, "precision": precision_name(amp_dtype),
              "timing": timer.method, "pairs": pairs,
              "dense_ms": statistics.median(times["dense"]),
              "compact_ms": statistics.median(times["compact"]),
              "speedup": statistics.median(ratios), "speedup_p25": q[0], "speedup_p75": q[2],
              "macs_ratio": macs_ratio, "macs_speedup": 1 / macs_ratio}
    if table is not None:
        report["table_speedup"] = table.total(dense.dims) / table.total(compact.dims)
    return report


def report_lines(r: dict) -> list[str]:
    lines = [f"dense {r['dense_ms']:.3f} ms, compact {r['compact_ms']:.3f} ms per batch of "
             f"{r['batch_size']} on {r['device']} ({r['precision']}, {r['pairs']} pairs)",
             f"measured speedup {r['speedup']:.2f}x (p25-p75 {r['speedup_p25']:.2f}-"
             f"{r['speedup_p75']:.2f})  promised by MACs {r['macs_speedup']:.2f}x (ratio "
             f"{r['macs_ratio']:.4f})" + (f"  by the latency table {r['table_speedup']:.2f}x"
                                          if "table_speedup" in r else "")]
    if r["speedup"] < SHORT_OF_MACS * r["macs_speedup"]:
        lines.append(f"warning: the compact model runs {r['speedup']:.2f}x faster where its MACs "
                     f"promise {r['macs_speedup']:.2f}x: at this size and batch, fixed costs "
                     f"(small matrix products, kernel launches, LayerNorm, copies) dominate; a "
                     f"latency table built here ranks by what this device does")
    return lines


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    amp_dtype = amp_dtype_for(device, args.amp, args.amp_dtype)
    ckpt = read_checkpoint(args.checkpoint)
    compact = build_model("deit_base_patch16_224", checkpoint=args.checkpoint).to(device).eval()
    dense = dense_of(args, ckpt, compact).to(device).eval()
    table = None
    if args.latency_table is not None:
        with open(args.latency_table) as f:
            table = LatencyTable.from_dict(json.load(f), source=f"--latency-table {args.latency_table}")
    batch = args.batch_size or (256 if device.type == "cuda" else 1)
    return speed_report(dense, compact, device, batch, amp_dtype, args.pairs, args.repeats, table)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = run(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else "\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
