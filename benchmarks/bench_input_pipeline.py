"""Study 4: does the input pipeline keep up? Images/s a loader delivers against images/s training consumes.

    python -m benchmarks.bench_input_pipeline [--quick] [--threads N] [--data-root DIR]

Real photos from /work/shared/data (skipped, exit 0, when absent):

- Imagenette (224 px JPEGs, ImageFolder) through `builders.build_loaders` itself, with
  revit_scratch.py's default flags (DeiT's augmentation: RandomResizedCrop, flip,
  RandAugment rand-m9-mstd0.5-inc1, color jitter 0.3, random erasing 0.25; repeated
  augmentation; SeededSampler + SeededDataset), against a DeiT-Ti/224 training step;
- CIFAR-10 (32 px, the npz arrays: a small Dataset over them here, since they are not in
  torchvision's format) through the same transform (`datasets.build_transform`, which uses
  the CIFAR recipe at 32 px) and the same sampler/dataset wrappers as build_loaders, against
  a CPU-sized model (32 px, patch 4, depth 4, embed 192).

The training step is the project's default one (engine.train_one_epoch's body with
revit_scratch.py's defaults: mixup/cutmix, soft-target cross entropy, drop-path 0.1, AdamW,
model EMA update) on a batch already in memory. For num_workers 0, 1, 2, interleaved with
the training step and repeated:

- delivered: a fresh loader iterator; the first 2 x workers + 1 batches (start-up and the
  prefetch queue) are skipped, then the time for the next batches gives images/s;
- consumed: images/s of the training step on a resident batch;
- ratio = delivered / consumed per interleaved pair (> 1: the loader alone is faster than
  training);
- fed: the training loop itself fed by that loader (fetch + step, timed after one untimed
  step so the prefetch queue is in its steady state), as a fraction of the resident-batch
  rate (1.0: no time lost to data). On this 2-core machine loader workers and the training
  step share the cores, which the isolated ratio does not show;
- fed, spared: the same with the main process's torch threads lowered to cores - workers
  (torch.set_num_threads, switched inside the interleaved loop), the remedy under test.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import builders
import datasets
import flags
import models
from benchmarks import common
from benchmarks.common import ROOT, md_table, ratio_stats
from samplers import RASampler, SeededDataset, SeededSampler

STUDY = "input_pipeline"
DATA = ROOT.parent / "shared" / "data"
WORKERS = (0, 1, 2)


class NpzCIFAR(Dataset):
    """CIFAR-10 from /work/shared/data/cifar10/*.npz (uint8 NHWC RGB) as PIL images."""

    def __init__(self, path: Path, train: bool, transform=None) -> None:
        data = np.load(path)
        split = "train" if train else "val"
        self.images, self.targets = data[f"x_{split}"], data[f"y_{split}"].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


def project_args(data_set: str, data_path: str, size: int, batch: int, workers: int,
                 model: str) -> argparse.Namespace:
    """The training script's flags (flags.py's groups) at their defaults, with the data set,
    size and loader given."""
    p = flags.Parser("the input pipeline's flags")
    flags.add_run_args(p)
    flags.add_model_args(p, widths=True)
    flags.add_ema_args(p)
    flags.add_optimizer_args(p)
    flags.add_data_args(p)
    flags.add_loss_args(p, kl_loss_coeff=0.0, student_eval_help="")
    args = p.parse_args([
        "--data-set", data_set, "--data-path", data_path, "--input-size", str(size),
        "--batch-size", str(batch), "--num_workers", str(workers), "--model", model,
        "--device", "cpu"])
    args.distributed, args.rank, args.world_size = False, 0, 1
    return args


def cifar_loader(args: argparse.Namespace, root: Path):
    """The train half of builders.build_loaders, over the npz Dataset."""
    ds = NpzCIFAR(root / "cifar10" / "cifar10_train20k.npz", True,
                  datasets.build_transform(True, args))
    base = (RASampler(ds, 1, 0, shuffle=True, seed=args.seed) if args.repeated_aug else
            DistributedSampler(ds, 1, 0, shuffle=True, seed=args.seed))
    sampler = SeededSampler(base, args.seed, 0)
    loader = DataLoader(SeededDataset(ds), sampler=sampler, batch_size=args.batch_size,
                        num_workers=args.num_workers, pin_memory=False, drop_last=True)
    return loader, sampler


def imagenette_loader(args: argparse.Namespace):
    loader, _, nb_classes, sampler = builders.build_loaders(args)
    assert nb_classes == 10
    return loader, sampler


def training_step(args: argparse.Namespace, dims_kwargs: dict):
    """A closure running the default training step on one resident or given batch."""
    torch.manual_seed(0)
    model = models.build_model(args.model, drop_path_rate=args.drop_path, **dims_kwargs).train()
    mixup = builders.build_mixup(args, 10)
    criterion = builders.build_criterion(args, 10, mixup, torch.device("cpu"),
                                         kl_tau=args.distillation_tau, per_head=True)
    optimizer = builders.build_optimizer(args, model)
    ema = builders.init_model_ema(args, model)

    def step(samples: torch.Tensor, targets: torch.Tensor) -> None:
        if mixup is not None:
            samples, targets = mixup(samples, targets)
        outputs = model(samples)
        loss = criterion(samples, outputs, targets)
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
    return step


def measure_set(label: str, make_loader, args_for, step_kwargs: dict, size: int, batch: int,
                n_batches: int, n_fed: int, repeats: int, warmup: int) -> dict:
    step = training_step(args_for(0), step_kwargs)
    resident = (torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
    loaders = {w: make_loader(args_for(w)) for w in WORKERS}
    threads = torch.get_num_threads()
    # the proposed remedy: leave the workers their cores (main threads = threads - workers)
    spared = {w: max(1, threads - w) for w in WORKERS if w and max(1, threads - w) != threads}
    times = {"step": [], **{f"load w{w}": [] for w in WORKERS},
             **{f"fed w{w}": [] for w in WORKERS}, **{f"fed w{w} spared": [] for w in spared}}

    def fresh(w: int, epoch: int):
        loader, sampler = loaders[w]
        sampler.set_epoch(epoch)
        it = iter(loader)
        for _ in range(2 * w + 1):  # start-up and the prefetch queue
            next(it)
        return it

    def fed(w: int, epoch: int) -> float:
        it = fresh(w, epoch)
        step(*next(it))  # untimed: workers refill their prefetch queue, then steady state
        t0 = time.perf_counter()
        for _ in range(n_fed):
            step(*next(it))
        return (time.perf_counter() - t0) / n_fed

    for r in range(warmup + repeats):
        keep = r >= warmup
        t0 = time.perf_counter()
        step(*resident)
        t_step = time.perf_counter() - t0
        measured = {"step": t_step}
        for w in WORKERS:
            it = fresh(w, 3 * r)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                next(it)
            measured[f"load w{w}"] = (time.perf_counter() - t0) / n_batches
            del it
            measured[f"fed w{w}"] = fed(w, 3 * r + 1)
            if w in spared:
                torch.set_num_threads(spared[w])
                try:
                    measured[f"fed w{w} spared"] = fed(w, 3 * r + 2)
                finally:
                    torch.set_num_threads(threads)
        if keep:
            for k, v in measured.items():
                times[k].append(v)
    rows = []
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    for w in WORKERS:
        row = {
            "set": label, "num_workers": w, "batch": batch, "main_threads": threads,
            # delivered/consumed = (step time per image) / (load time per image)
            "delivered_over_consumed": ratio_stats(times["step"], times[f"load w{w}"]),
            "fed_over_resident": ratio_stats(times["step"], times[f"fed w{w}"]),
            "delivered_img_s": batch / med(times[f"load w{w}"]),
            "consumed_img_s": batch / med(times["step"]),
            "fed_img_s": batch / med(times[f"fed w{w}"]),
        }
        if w in spared:
            row["spared_main_threads"] = spared[w]
            row["fed_spared_over_resident"] = ratio_stats(times["step"], times[f"fed w{w} spared"])
            row["fed_spared_img_s"] = batch / med(times[f"fed w{w} spared"])
        rows.append(row)
    return {"set": label, "rows": rows, "times": times}


def spared_cell(r: dict) -> str:
    if "fed_spared_over_resident" not in r:
        return "-"
    f = r["fed_spared_over_resident"]
    return f"{f['median']:.2f} ({f['p25']:.2f}-{f['p75']:.2f}), {r['spared_main_threads']} thread"


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "few batches (a smoke test, not a result)")
    p.add_argument("--data-root", default=str(DATA), help="the shared data directory")
    args = p.parse_args()
    root = Path(args.data_root)
    if not (root / "imagenette_224_subset").is_dir() or not (root / "cifar10").is_dir():
        print(f"skipped: the real image sets are not in {root} (expected imagenette_224_subset/ "
              f"and cifar10/, see /work/shared/data/README.md)")
        return
    name = common.apply_study_args(args, STUDY)
    q = args.quick
    # (batch, timed batches per loader run, fed steps, repeats, warmup)
    im = (8, 2, 1, 2, 0) if q else (16, 8, 2, 4, 1)
    cf = (16, 2, 1, 2, 0) if q else (64, 10, 3, 8, 1)
    imagenette = str(root / "imagenette_224_subset")
    load = os.getloadavg()
    results = [
        measure_set("Imagenette 224 px / DeiT-Ti", imagenette_loader,
                    lambda w: project_args("FOLDER", imagenette, 224, im[0], w,
                                           "deit_tiny_patch16_224"),
                    dict(num_classes=10), 224, *im),
        measure_set("CIFAR-10 32 px / CPU-sized ViT", lambda a: cifar_loader(a, root),
                    lambda w: project_args("CIFAR10", str(root / "cifar10"), 32, cf[0], w,
                                           "deit_tiny_patch16_224"),
                    dict(dims=models.Dims.uniform(192, 4, 3, 768), img_size=32, patch_size=4,
                         num_classes=10), 32, *cf),
    ]
    table = []
    for res in results:
        for r in res["rows"]:
            s, f = r["delivered_over_consumed"], r["fed_over_resident"]
            table.append([r["set"], r["num_workers"], r["batch"],
                          f"{s['median']:.2f} ({s['p25']:.2f}-{s['p75']:.2f})",
                          f"{r['delivered_img_s']:.0f}", f"{r['consumed_img_s']:.0f}",
                          f"{f['median']:.2f} ({f['p25']:.2f}-{f['p75']:.2f})",
                          spared_cell(r)])
    md = md_table(["data / model", "num_workers", "batch", "delivered / consumed (p25-p75)",
                   "delivered img/s", "consumed img/s", "fed loop / resident batch (p25-p75)",
                   "fed loop, main threads = cores - workers / resident"], table)
    md += ("\n\ndelivered / consumed > 1: the loader alone outpaces a training step. fed loop / "
           "resident batch: the training loop fed by the loader, as a fraction of its speed on "
           "a batch already in memory (1.0 = data never starves the model), timed after one "
           "untimed step so the workers' prefetch queue is in its steady state. Last column: the "
           "same fed loop with the main process's torch threads lowered to leave the workers "
           f"their cores. img/s are medians for context. {torch.get_num_threads()} torch "
           "threads in the main process; loader workers run 1 thread each on the same cores.")
    common.publish(name, md, load, q, data_root=str(root), sets=results)


if __name__ == "__main__":
    sys.exit(main())
