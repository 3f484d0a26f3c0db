"""Promised against delivered: how much faster a pruned model runs than the model it came from.

    python -m tools.speed_report OUT/pruned_checkpoint.pth [--device cuda] [--batch-size 256] [--amp]
    python -m tools.speed_report COMPACT.pth --dense deit_base_distilled_patch16_224
    python -m tools.speed_report OUT/pruned_checkpoint.pth --runtime onnxruntime --int8 \
        --batch-size 32 --data-set IMNET --data-path /data/imagenet --dense DENSE.pth

Times the dense and the compact model (eval forward under torch.inference_mode, the timing of
tools/build_latency_table.py: wall clock on the CPU, CUDA events on a GPU) in interleaved
pairs after warm-up, and prints the median speedup of the pairs (p25-p75) beside what was
promised: the MACs ratio and, with --latency-table (or the run's own cost when it was a
latency table), the table's prediction. Fewer MACs do not always mean faster: small matrix
products, unequal attention widths and fixed per-layer costs keep a compact model from its
MACs ratio; a warning says so when the measured speedup falls well short of it. The dense
model is rebuilt from the checkpoint's `original_dims` (weights do not change the timing).

--runtime times both in the runtime the model is deployed with (torch, torch-compile,
onnxruntime, or tensorrt where ONNX Runtime has its TensorRT provider; pruning/runtimes.py);
--int8 adds the compact model in int8 (the runtime's CPU int8: ONNX Runtime's or torch's
dynamic quantization) to every round. With --data-set, the same runners score the
validation set: top-1 of dense fp32 (measured when --dense is a weights file, else the
top-1 the pruning run recorded), compact fp32 and compact int8, side by side.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from checkpoints import is_url
from datasets import build_dataset
from engine import amp_dtype_for, evaluate
from errors import UserError
from flags import (COUNT, POSITIVE_INT, Parser, add_amp_dtype_arg, add_runtime_arg, ranged,
                   tool_call)
from models import ReViT, build_model, dims_from_dict, model_class, read_checkpoint
from pruning import runtimes
from pruning.cost import build_cost_model
from pruning.latency import report_lines, speed_report
from utils import resolve_device

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
    add_runtime_arg(p, "the runtime both models are timed (and scored) in")
    p.add_argument("--int8", action="store_true",
                   help="also time (and score) the compact model in the runtime's CPU int8")
    g = p.add_argument_group("top-1 side by side (optional)")
    g.add_argument("--data-set", default=None, type=str.upper,
                   help="score the models on this data set's validation images (as --eval)")
    g.add_argument("--data-path", default=None)
    g.add_argument("--inat-category", default="name")
    g.add_argument("--eval-crop-ratio", default=0.875,
                   type=ranged(float, 0.0, 1.0, low_open=True))
    g.add_argument("--eval-batch-size", default=64, type=POSITIVE_INT)
    g.add_argument("--num-workers", default=2, type=COUNT)
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
    dims = dims_from_dict(ckpt["original_dims"], source=f"original_dims in {args.checkpoint}")
    return model_class(dims)(dims)


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
        source = f"--latency-table {args.latency_table}"
        try:
            with open(args.latency_table) as f:
                data = json.load(f)
        except ValueError as e:
            raise UserError(f"{source}: not JSON ({e})") from None
        try:
            table = build_cost_model("latency", dense.dims, data)
        except UserError as e:
            raise UserError(f"{source}: {e}".replace(f"{source}: latency table: ", f"{source}: ")) from None
    batch = args.batch_size or (256 if device.type == "cuda" else 1)
    report = speed_report(dense, compact, device, batch, amp_dtype, args.pairs, args.repeats,
                          table, runtime=args.runtime, int8=args.int8)
    if args.data_set is not None:
        report["top1"] = top1_side_by_side(args, ckpt, dense, compact, device, amp_dtype)
    return report


def top1_side_by_side(args, ckpt: dict, dense: ReViT, compact: ReViT, device,
                      amp_dtype) -> dict:
    """Top-1 (%) of each timed variant on the validation set, run in the timed runtime; the
    dense one's is the pruning run's record unless --dense gave its weights."""
    d = compact.dims
    frame = SimpleNamespace(data_set=args.data_set, data_path=args.data_path,
                            input_size=d.img_size, inat_category=args.inat_category,
                            eval_crop_ratio=args.eval_crop_ratio)
    dataset, classes = build_dataset(False, frame)
    if classes != d.num_classes:
        raise UserError(f"--data-set {args.data_set} has {classes} classes, the model "
                        f"{d.num_classes}")
    loader = DataLoader(dataset, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    example = next(iter(loader))[0][:1].to(device)
    top1 = {"data_set": args.data_set, "images": len(dataset)}
    variants = {"compact": (compact, False)}
    if args.int8:
        variants["int8"] = (compact, True)
    weighted_dense = args.dense is not None and (Path(args.dense).exists() or is_url(args.dense))
    if weighted_dense:
        variants = {"dense": (dense, False), **variants}
    else:
        top1["dense"], top1["dense_recorded"] = ckpt.get("top1_dense"), True
    for name, (model, int8) in variants.items():
        run = runtimes.prepare(model, args.runtime, device, amp_dtype, example, int8)
        top1[name] = evaluate(loader, runtimes.Deployed(run), device)["acc1"]
    return top1


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    code, report = tool_call(lambda: run(args))
    if code:
        return code
    print(json.dumps(report, indent=1) if args.json else "\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
