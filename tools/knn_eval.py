"""k-NN and linear-probe top-1 of a model's frozen features: an encoder judged without its
classifier (probes.py: DINO's weighted k-NN vote, k = 20, cosine, T = 0.07; a scikit-learn
logistic regression on the standardised features).

    python -m tools.knn_eval OUT/pruned_checkpoint.pth --dense --data-set DIGITS
    python -m tools.knn_eval MODEL.pth --data-set FOLDER --data-path DIR     # DIR/train, DIR/val

The features are the model's pooled pre-logits features (timm's `forward_head(...,
pre_logits=True)`), of the data set's train split (the k-NN's memory and the probe's
training data) and of its val split (scored), both with the evaluation transform. `--dense`
scores the model it was pruned from the same way, side by side: what pruning cost, at a
glance. Without a path it is the pruning run's --pretrained-path, as recorded in the
checkpoint.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import sys
from types import SimpleNamespace

from torch.utils.data import DataLoader

import probes
from datasets import build_dataset
from engine import amp_dtype_for, extract_features
from errors import UserError
from flags import COUNT, POSITIVE_INT, Parser, add_amp_dtype_arg, ranged, tool_call
from models import build_model, read_checkpoint
from utils import resolve_device

RECORDED = "recorded"  # --dense without a path: the pruning run's own --pretrained-path


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("k-NN and linear-probe top-1 of a model's frozen features (and of the dense "
               "model it was pruned from).")
    p.add_argument("checkpoint", help="any model file nvit reads (a pruned_checkpoint.pth, a "
                                      "training checkpoint, a hub folder, a timm state dict)")
    p.add_argument("--model", default="deit_base_patch16_224",
                   help="timm name for a foreign state dict whose structure the tensors do not "
                        "tell (ours record their dims)")
    p.add_argument("--dense", nargs="?", const=RECORDED, default=None,
                   help="also score the dense model: this checkpoint, or without a value the "
                        "pruning run's --pretrained-path recorded in CHECKPOINT")
    p.add_argument("--data-set", required=True, type=str.upper,
                   help="DIGITS, CIFAR, FOLDER (DIR/train and DIR/val), ...: its train split "
                        "is the k-NN memory and the probe's data, its val split is scored")
    p.add_argument("--data-path", default=None)
    p.add_argument("--inat-category", default="name")
    p.add_argument("--eval-crop-ratio", default=0.875, type=ranged(float, 0.0, 1.0, low_open=True))
    p.add_argument("--k", default=probes.KNN_K, type=POSITIVE_INT, help="neighbours (DINO: 20)")
    p.add_argument("--temperature", default=probes.KNN_TEMPERATURE,
                   type=ranged(float, 0.0, None, low_open=True),
                   help="the vote's weight exp(similarity / T) (DINO: 0.07)")
    p.add_argument("--probe-iterations", default=1000, type=POSITIVE_INT,
                   help="the logistic regression's max_iter")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on the CPU")
    add_amp_dtype_arg(p)
    p.add_argument("--batch-size", default=256, type=POSITIVE_INT)
    p.add_argument("--num-workers", default=2, type=COUNT)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def dense_source(args, ckpt: dict) -> str:
    if args.dense != RECORDED:
        return args.dense
    run_args = ckpt.get("args") or {}
    run_args = vars(run_args) if hasattr(run_args, "__dict__") else run_args
    source = run_args.get("pretrained_path") if isinstance(run_args, dict) else None
    if not source:
        raise UserError(f"{args.checkpoint} records no --pretrained-path of a pruning run; "
                        f"give the dense model's file: --dense FILE", field="dense")
    return source


def loaders(args, img_size: int) -> tuple[DataLoader, DataLoader, int]:
    """The train and val splits, both with the evaluation transform."""
    frame = SimpleNamespace(data_set=args.data_set, data_path=args.data_path,
                            input_size=img_size, inat_category=args.inat_category,
                            eval_crop_ratio=args.eval_crop_ratio)
    train, classes = build_dataset(True, frame, augment=False)
    val, _ = build_dataset(False, frame)
    return (DataLoader(train, batch_size=args.batch_size, num_workers=args.num_workers),
            DataLoader(val, batch_size=args.batch_size, num_workers=args.num_workers), classes)


def scores(model, train_loader, val_loader, classes: int, args, device, amp_dtype) -> dict:
    model = model.to(device)
    bank, bank_labels = extract_features(train_loader, model, device, amp_dtype)
    queries, labels = extract_features(val_loader, model, device, amp_dtype)
    return {"knn_top1": probes.knn_top1(bank, bank_labels, queries, labels, classes,
                                        args.k, args.temperature),
            "linear_probe_top1": probes.linear_probe_top1(bank, bank_labels, queries, labels,
                                                          args.probe_iterations),
            "features": int(bank.shape[1])}


def run(args) -> dict:
    device = resolve_device(args.device)
    amp_dtype = amp_dtype_for(device, args.amp, args.amp_dtype)
    ckpt = read_checkpoint(args.checkpoint)
    models = {"model": build_model(args.model, checkpoint=args.checkpoint)}
    if args.dense is not None:
        models["dense"] = build_model(args.model, checkpoint=dense_source(args, ckpt))
    img = models["model"].dims.img_size
    train_loader, val_loader, classes = loaders(args, img)
    report = {"data_set": args.data_set, "train_images": len(train_loader.dataset),
              "val_images": len(val_loader.dataset), "k": args.k,
              "temperature": args.temperature}
    for name, model in models.items():
        report[name] = scores(model, train_loader, val_loader, classes, args, device, amp_dtype)
    return report


def report_lines(r: dict) -> list[str]:
    lines = [f"{r['data_set']}: features of {r['train_images']} train images (k-NN memory, "
             f"probe data), {r['val_images']} val images scored",
             f"{'':8} {'k-NN top-1':>12} {'linear probe':>13} {'features':>9}   "
             f"(k = {r['k']}, T = {r['temperature']:g})"]
    for name in ("model", "dense"):
        if name in r:
            s = r[name]
            lines.append(f"{name:8} {s['knn_top1']:>11.2f}% {s['linear_probe_top1']:>12.2f}% "
                         f"{s['features']:>9}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    code, report = tool_call(lambda: run(args))
    if code:
        return code
    print(json.dumps(report, indent=1) if args.json else "\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
