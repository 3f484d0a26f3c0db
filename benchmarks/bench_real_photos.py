"""Study 6: the real scripts on real photos. A short revit_scratch.py run, then nvit_prune.py on its result.

    python -m benchmarks.bench_real_photos [--quick] [--threads N] [--data-root DIR]

Both entry scripts run as subprocesses, exactly as a user would start them, on Imagenette
(`--data-set FOLDER --data-path .../imagenette_224_subset`: 3,000 train / 1,000 val real
224 px photos of 10 classes) at reduced size: 64 px input, patch 8, a small ReViT-shaped
dims file (6 blocks, embed 128, per-block heads and MLP widths), DeiT's default
augmentation (RandAugment, mixup/cutmix, random erasing, repeated augmentation),
--num_workers 2, on the CPU:

1. revit_scratch.py trains it from scratch for 2 epochs;
2. nvit_prune.py prunes that checkpoint toward 50% of its MACs (hessian saliency, the
   reference pruning config, KL to the frozen full model, --pruning_exit), then evaluates.

Their printed output is parsed for training images/s (the progress logger's rate, data
loading included), top-1, prune steps and the MACs ratio reached; the table also gives the
wall time and whether each ended successfully. It is a check that the real pipeline works
end to end on real photos and of its speed on this machine, not an accuracy result (two
epochs at 64 px). Skipped (exit 0) when the data directory is absent.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import common
from benchmarks.common import ROOT, md_table
STUDY = "real_photos"
DATA = ROOT.parent / "shared" / "data"
DIMS = {"embed_dim": 128, "num_heads": [4, 2, 2, 4, 4, 4], "qk_dim": [16] * 6, "v_dim": [32] * 6,
        "mlp_dim": [256, 384, 512, 512, 384, 256]}
QUICK_PER_CLASS = {"train": 26, "val": 10}  # 260 train: one epoch of 256 (RASampler), 4 batches
PROGRESS = re.compile(r"^Epoch \[(\d+)\] \[(\d+)/(\d+)\].*img/s ([\d.]+)")


def photo_subset(data: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """An ImageFolder of symlinks to the first photos of every class (for --quick)."""
    for split, n in per_class.items():
        for cls in sorted(d for d in (data / split).iterdir() if d.is_dir()):
            (dest / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                (dest / split / cls.name / f.name).symlink_to(f.resolve())
    return dest


def common_flags(data_path: Path, epochs: int, workers: int, batch: int) -> list[str]:
    return ["--model", "deit_tiny_patch16_224", "--data-set", "FOLDER",
            "--data-path", str(data_path), "--input-size", "64", "--patch-size", "8",
            "--epochs", str(epochs), "--batch-size", str(batch), "--num_workers", str(workers),
            "--device", "cpu", "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--unscale-lr", "--print-freq", "10", "--seed", "0"]


def run(script: str, flags: list[str], threads: int | None, timeout: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, script, *flags]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    prefix = [f"{k}={env[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in env]
    return {"command": " ".join([*prefix, "python", script, *flags]), "returncode": code,
            "ok": code == 0, "seconds": time.perf_counter() - start, "stdout": out,
            "stderr_tail": err[-3000:]}


def epoch_rates(stdout: str) -> list[float]:
    """The training images/s of each epoch: its last progress line (cumulative over the epoch)."""
    last: dict[int, float] = {}
    for line in stdout.splitlines():
        m = PROGRESS.match(line)
        if m:
            last[int(m.group(1))] = float(m.group(4))
    return [last[e] for e in sorted(last)]


def parse_revit(stdout: str) -> dict:
    top1 = [float(x) for x in re.findall(r"^Epoch \d+: top-1 ([\d.]+)%", stdout, re.M)]
    best = re.search(r"best top-1 ([\d.]+)%\s*$", stdout, re.M)
    return {"train_img_s": epoch_rates(stdout), "top1_per_epoch": top1,
            "top1": top1[-1] if top1 else None,
            "best_top1": float(best.group(1)) if best else None}


def parse_prune(stdout: str) -> dict:
    dense = re.search(r"^before pruning: top-1 ([\d.]+)%", stdout, re.M)
    final = re.search(r"^pruned model: macs ratio ([\d.]+) of the original, top-1 ([\d.]+)%",
                      stdout, re.M)
    steps = re.findall(r"^prune step (\d+): macs ratio ([\d.]+).*img/s ([\d.]+)", stdout, re.M)
    rates = [float(s[2]) for s in steps]
    later = rates[1:] or rates  # the first interval also holds the start-up
    return {"train_img_s": epoch_rates(stdout),
            "img_s": sorted(later)[len(later) // 2] if later else None,
            "top1_dense": float(dense.group(1)) if dense else None,
            "prune_steps": len(steps),
            "prune_img_s": rates,
            "macs_ratio": float(final.group(1)) if final else None,
            "top1": float(final.group(2)) if final else None}


def main() -> None:
    p = common.study_parser(__doc__, STUDY,
                            "26 train / 10 val photos per class, 1 epoch, prune step every "
                            "iteration (a smoke test, not a result)")
    p.add_argument("--data-root", default=str(DATA), help="the shared data directory")
    p.add_argument("--timeout", type=int, default=300, help="seconds allowed per script")
    args = p.parse_args()
    data = Path(args.data_root) / "imagenette_224_subset"
    if not (data / "train").is_dir():
        print(f"skipped: {data} is absent (the real photo set, see /work/shared/data/README.md)")
        return
    name = common.apply_study_args(args, STUDY, set_threads=False)  # --threads: the scripts'
    epochs, workers, batch, interval, per_iter = (1, 1, 64, 1, 1024) if args.quick else \
        (2, 2, 64, 2, 64)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_real_photos_") as tmp:
        tmp = Path(tmp)
        (tmp / "dims.yaml").write_text(yaml.safe_dump(DIMS, default_flow_style=None))
        data_arg = Path(os.path.relpath(data, ROOT))
        if args.quick:  # a few real photos per class: the same pipeline in seconds
            data_arg = photo_subset(data, tmp / "subset", QUICK_PER_CLASS)
        base = common_flags(data_arg, epochs, workers, batch)
        train = run("revit_scratch.py", base + [
            "--no-model-ema", "--dims", str(tmp / "dims.yaml"), "--lr", "1e-3", "--output_dir", str(tmp / "revit")],
            args.threads, args.timeout)
        train.update(parse_revit(train["stdout"]))
        ckpt = tmp / "revit" / "checkpoint.pth"
        if train["ok"] and ckpt.is_file():
            prune = run("nvit_prune.py", base + [
                "--pretrained-path", str(ckpt), "--lr", "5e-4", "--pruning", "--cost", "macs",
                "--latency_target", "0.5", "--pruning_config", "configs/nvit_reference.json",
                "--prune_per_iter", str(per_iter), "--interval_prune", str(interval),
                "--kl_loss_coeff", "1", "--pruning_exit", "--output_dir", str(tmp / "pruned")],
                args.threads, args.timeout)
            prune.update(parse_prune(prune["stdout"]))
            prune["pruned_checkpoint_written"] = (tmp / "pruned" / "pruned_checkpoint.pth").is_file()
        else:
            prune = {"command": "nvit_prune.py (not run: revit_scratch.py failed)", "ok": False,
                     "returncode": None, "seconds": 0.0, "stdout": "", "stderr_tail": ""}
            prune.update(parse_prune(""))
        for r in (train, prune):
            r["command"] = r["command"].replace(str(tmp), "TMP")
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    ok = lambda r: "yes" if r["ok"] else f"NO (exit {r['returncode']})"  # noqa: E731
    table = [
        ["revit_scratch.py (train from scratch)", ok(train), f"{train['seconds']:.0f}",
         len(train["train_img_s"]), fmt(train["train_img_s"][-1] if train["train_img_s"] else None),
         fmt(train["top1"]), "-", "-"],
        ["nvit_prune.py (prune toward 50% MACs)", ok(prune), f"{prune['seconds']:.0f}",
         len(prune["train_img_s"]) or (1 if prune["prune_steps"] else 0), fmt(prune["img_s"]),
         f"{fmt(prune['top1'])} (dense {fmt(prune['top1_dense'])})", prune["prune_steps"],
         fmt(prune["macs_ratio"], "{:.3f}")],
    ]
    md = md_table(["run", "ended successfully", "wall s", "epochs run", "train img/s", "top-1 %",
                   "prune steps", "MACs ratio"], table)
    threads = args.threads or os.environ.get("OMP_NUM_THREADS") or \
        f"{os.cpu_count()} (torch's default)"
    photos = ("Imagenette subset, 3,000 train / 1,000 val real photos" if not args.quick else
              f"{QUICK_PER_CLASS['train']} train / {QUICK_PER_CLASS['val']} val Imagenette "
              f"photos per class (--quick)")
    md += (f"\n\n{photos}, 10 classes, at 64 px, patch 8, dims {DIMS}, batch {batch}, "
           f"--num_workers {workers}, DeiT's default augmentation, "
           f"{threads} torch threads. train img/s: revit_scratch.py's progress "
           "rate over its last epoch; nvit_prune.py's median rate between prune steps (both "
           "include data loading). Two short CPU runs: a check of the real pipeline, not an "
           "accuracy result.\n\nCommands:\n\n"
           + "\n".join(f"    {r['command']}" for r in (train, prune)))
    for r in (train, prune):
        r["stdout_tail"] = r.pop("stdout")[-4000:]
    common.publish(name, md, load, args.quick, train=train, prune=prune)
    if not (train["ok"] and prune["ok"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
