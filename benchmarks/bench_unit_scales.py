"""Study 14: unit scales that fit the model: --unit-scales auto against the reference's and ones.

    python -m benchmarks.bench_unit_scales [--quick] [--seeds 0,1,2] [--work-dir DIR]

Four families (--families deit,clip,swiglu,rotary) of the same small width on DIGITS (32 px, patch 8, six blocks of 96 channels,
four heads of 24, MLP 384), each trained with labels once (the README's recipe), then pruned
by the shipped scripts, run as a user runs them, toward 50% and 25% of its MACs (one run,
two targets) with three sets of unit scales, and each pruned model finetuned the same way:

  DeiT (`deit_small_patch16_224`): a classifier, the reference's objective (KL + label loss),
      judged by top-1 after finetuning;
  CLIP-style (`vit_base_patch16_clip_quickgelu_224`: pre-norm, QuickGELU), SwiGLU
      (`vit_giant_patch14_dinov2`'s structure: packed SwiGLU, LayerScale) and SwiGLU + rotary
      (`eva02_tiny_patch14_224`'s: rotary pairs as QK units, Q and V biases, avg pool):
      backbones pruned and finetuned label-free (1 - cos of the pooled features) on the
      images alone, judged by the k-NN top-1 of their frozen features (tools.knn_eval).

Scales: "reference" (12, 12, 2, 2, 1, configs/nvit_reference.json), "ones"
(configs/nvit_unit_scales.json), "auto" (--unit-scales auto: derived from the model's MACs).
Per family, budget and scales over the seeds: the score's mean +- sd, and the seed-paired
difference to the reference's scales with a 95% t interval (the seed orders the batches of
pruning and finetuning; the dense model is shared). Every run's files stay in the work dir
and a finished step is not run again, so a stopped study resumes.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks import common
from benchmarks.common import ROOT, interval_text, md_table, mean_sd, paired_interval, pm

STUDY = "unit_scales"
FAMILIES = {  # key: (what the report calls it, timm name, label-free)
    "deit": ("DeiT", "deit_small_patch16_224", False),
    "clip": ("CLIP-style (pre-norm, QuickGELU)", "vit_base_patch16_clip_quickgelu_224", True),
    "swiglu": ("SwiGLU (DINOv2-g structure)", "vit_giant_patch14_dinov2", True),
    "rotary": ("SwiGLU + rotary (EVA-02 structure)", "eva02_tiny_patch14_224", True),
}
SCALES = {"reference": [], "ones": ["--pruning_config", "configs/nvit_unit_scales.json"],
          "auto": ["--unit-scales", "auto"]}
BUDGETS = (0.5, 0.25)
DIMS = {"embed_dim": 96, "num_heads": 4, "qk_dim": 24, "v_dim": 24, "mlp_dim": 384, "depth": 6}
FULL = dict(dense_epochs=40, prune_epochs=30, ft_epochs=10, budgets=BUDGETS)
QUICK = dict(dense_epochs=2, prune_epochs=3, ft_epochs=1, budgets=(0.5,),
             dims={**DIMS, "embed_dim": 32, "num_heads": 2, "qk_dim": 16, "v_dim": 16,
                   "mlp_dim": 64, "depth": 2})


def script(name: str, *flags, log: Path, timeout: int = 3600) -> str:
    """Run an entry script or tool as a user would; its stdout (also kept in `log`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, *(["-m", name] if name.startswith("tools.") else [name]),
           *map(str, flags)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return proc.stdout


def dense(family: str, work: Path, recipe: dict) -> Path:
    """The family's dense model, trained with labels once (the README's CLIP demo recipe)."""
    _, name, _ = FAMILIES[family]
    out = work / f"dense_{name}"
    ckpt = out / "checkpoint.pth"
    if not ckpt.is_file():
        dims = work / "dims.yaml"
        dims.write_text(yaml.safe_dump(recipe["dims"]))
        print(f"{family}: training the dense model", flush=True)
        script("revit_scratch.py", "-c", "configs/runs/digits_train.yaml", "--model", name,
               "--dims", dims, "--lr", "1e-3", "--warmup-epochs", "3", "--epochs",
               recipe["dense_epochs"], "--output_dir", out, log=work / f"dense_{name}.log")
    return ckpt


def score(family: str, ckpt: Path, log: Path) -> float:
    """Top-1 of a classifier's last finetune epoch; a backbone's k-NN top-1 (tools.knn_eval)."""
    if not FAMILIES[family][2]:
        text = log.read_text()
        return float(re.findall(r"^Epoch \d+: top-1 ([\d.]+)%", text, re.M)[-1])
    report = json.loads(script("tools.knn_eval", ckpt, "--data-set", "DIGITS", "--json",
                               log=log.with_suffix(".knn.log")))
    return report["model"]["knn_top1"]


def run(family: str, scales: str, seed: int, dense_ckpt: Path, images: Path, work: Path,
        recipe: dict) -> list[dict]:
    """Prune one (family, scales, seed) to every budget, finetune each; one row per budget."""
    _, name, label_free = FAMILIES[family]
    tag = f"{name}_{scales}_s{seed}"
    done = work / f"rows_{tag}.json"
    if done.is_file():
        return json.loads(done.read_text())
    data = ["--data-path", images] if label_free else []
    prune_cfg = "digits_prune_label_free.yaml" if label_free else "digits_prune.yaml"
    ft_cfg = "digits_finetune_label_free.yaml" if label_free else "digits_finetune.yaml"
    out = work / f"prune_{tag}"
    targets = ",".join(f"{b:g}" for b in recipe["budgets"])
    print(f"{family}, {scales} scales, seed {seed}: pruning to {targets}", flush=True)
    t0 = time.perf_counter()
    script("nvit_prune.py", "-c", f"configs/runs/{prune_cfg}", "--model", name,
           "--pretrained-path", dense_ckpt, *data, *SCALES[scales], "--seed", seed,
           "--latency_target", targets, "--epochs", recipe["prune_epochs"],
           "--speed-report-pairs", 0, "--output_dir", out, log=work / f"prune_{tag}.log")
    rows = []
    for budget in recipe["budgets"]:
        pruned = out / (f"pruned_{budget:g}.pth" if len(recipe["budgets"]) > 1
                        else "pruned_checkpoint.pth")
        ft = work / f"ft_{tag}_{budget:g}"
        log = work / f"ft_{tag}_{budget:g}.log"
        script("revit_scratch.py", "-c", f"configs/runs/{ft_cfg}", "--finetune", pruned,
               "--pretrained-path", dense_ckpt, *data, "--seed", seed, "--epochs",
               recipe["ft_epochs"], "--output_dir", ft, log=log)
        ck = torch.load(pruned, map_location="cpu", weights_only=True)
        rows.append({"family": family, "scales": scales, "seed": seed, "budget": budget,
                     "macs_ratio": ck["cost_ratio"], "score": score(family, ft / "checkpoint.pth", log),
                     "dims": {k: ck["dims"][k] for k in ("embed_dim", "num_heads", "qk_dim",
                                                          "v_dim", "mlp_dim")}})
    for r in rows:
        r["seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(rows))
    return rows


def report(rows: list[dict], dense_scores: dict, recipe: dict) -> str:
    headers = ["family (score)", "budget", "scales", "MACs ratio", "score", "− reference (95% CI)",
               "kept: emb / heads / QK / V / MLP (first seed)"]
    table = []
    for family in dense_scores:
        label, _, label_free = FAMILIES[family]
        what = "k-NN top-1" if label_free else "top-1"
        for budget in recipe["budgets"]:
            ref = {r["seed"]: r["score"] for r in rows if r["family"] == family
                   and r["budget"] == budget and r["scales"] == "reference"}
            for scales in SCALES:
                rs = sorted((r for r in rows if r["family"] == family and r["budget"] == budget
                             and r["scales"] == scales), key=lambda r: r["seed"])
                if not rs:
                    continue
                diff = "" if scales == "reference" else interval_text(paired_interval(
                    [r["score"] - ref[r["seed"]] for r in rs if r["seed"] in ref]))
                d = rs[0]["dims"]
                kept = (f"{d['embed_dim']} / {sum(d['num_heads'])} / {sum(d['qk_dim'])} / "
                        f"{sum(d['v_dim'])} / {sum(d['mlp_dim'])}")
                table.append([f"{label} ({what}; dense {dense_scores[family]:.2f})",
                              f"{budget:g}", scales,
                              pm(mean_sd([r["macs_ratio"] for r in rs]), 3),
                              pm(mean_sd([r["score"] for r in rs])), diff, kept])
    return md_table(headers, table)


def main(argv: list[str] | None = None) -> None:
    p = common.study_parser(__doc__, STUDY, "tiny models, one budget, one epoch each (CI)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"a comma-separated subset of {', '.join(FAMILIES)}")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "work" / "unit_scales"))
    args = p.parse_args(argv)
    name = common.apply_study_args(args, STUDY, set_threads=False)
    if args.threads:  # the scripts this study runs take theirs from the environment
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    recipe = {**FULL, "dims": DIMS, **(QUICK if args.quick else {})}
    seeds = [int(s) for s in args.seeds.split(",")]
    families = [f for f in args.families.split(",") if f]
    if not families or set(families) - set(FAMILIES):
        raise SystemExit(f"--families wants a comma-separated subset of {', '.join(FAMILIES)}")
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    images = work / "digits_images"
    if not images.is_dir():
        script("tools.digits_folder", images, log=work / "digits_folder.log")
    t0 = time.perf_counter()
    rows, dense_scores = [], {}
    for family in families:
        ckpt = dense(family, work, recipe)
        dense_scores[family] = score(family, ckpt, work / f"dense_{FAMILIES[family][1]}.log")
        for seed in seeds:  # seed-major: a stopped study has every scale at its first seeds
            for scales in SCALES:
                rows += run(family, scales, seed, ckpt, images, work, recipe)
    md = report(rows, dense_scores, recipe)
    common.publish(name, md, load, args.quick, recipe=recipe, seeds=seeds,
                   dense=dense_scores, rows=rows, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
