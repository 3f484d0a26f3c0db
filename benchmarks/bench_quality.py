"""Study 5: pruning quality on real data - NViT's saliency against simpler criteria and Torch-Pruning.

    python -m benchmarks.bench_quality [--data cifar10|digits] [--quick] [--seeds 0,1,2]
        [--methods hessian_macs,...] [--budgets 0.5,0.25] [--keep] [--work-dir DIR]
        [--threads 2] [--dense-only] [--train-only]

One dense DeiT-style model is trained once on real images (CIFAR-10 subset from
../shared/data/cifar10, else scikit-learn's DIGITS) until its top-1 plateaus; a committed
copy under benchmarks/models/ (manifest.json: command, sha256) is used when its recipe
matches, else the work dir's, else it is trained. From the same dense weights every method
reaches 50% and 25% of the dense MACs, once per seed (the seed orders the batches, draws the
random scores and initialises (g)):

  (a) NViT as published: hessian saliency, reference scales, MACs cost
  (b) NViT with a CPU latency table, lambda calibrated at the first prune step
  (c) hessian with unit scales   (d) first-order Taylor   (e) weight magnitude   (f) random
  (g) uniform width scaling trained from scratch for the same total epochs
  (h) Torch-Pruning's ViT recipe (isomorphic global pruning, group Taylor, heads)

(a)-(f) run the shipped pruning loop (pruning.loop.PruningLoop over engine.train_one_epoch)
with the reference's loss (losses.FullModelKLLoss: KL at T=3 from the first prune step,
student in eval mode, constant learning rate), one trajectory through 50% to 25%; every
pruned model, (h) included, gets the same finetune (the reference's: KL per head at T=20 plus
the label loss). Reported per method and budget over the seeds: top-1 after pruning and after
finetuning (mean +- sd), the paired difference to (a) with a 95% t interval, params, MACs and
CPU latency at batch 1 and 32 relative to the dense model (interleaved). Every (method, seed)
is saved when done and every from-scratch epoch is checkpointed, so a stopped study resumes.
Results go to benchmarks/results/quality[_quick].{json,md,*.png}. With --keep a run adds to
the written result (refused unless recipe, threads and dense top-1 match): it keeps its rows
and runs only the asked-for (method, budget, seed) it lacks, so the study can be split over
machines and sessions whose work dirs do not survive; when only (g) runs, the dense weights
are not needed: the dense model's top-1 is the result's, its shape the latency reference.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Spinning OpenMP threads collapse (up to 100x here) when another process shares the cores;
# passive waiting keeps a busy machine's numbers sane. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import models  # noqa: E402
from atomic import write_text_atomic  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import (ROOT, interval_text, md_table, mean_sd,  # noqa: E402
                               paired_interval, pm, uniform_dims, write_results)
from benchmarks.quality_config import (BUDGETS, FULL, METHODS, QUICK, REFERENCE, SWIN,  # noqa: E402
                                       SWIN_METHODS, SWIN_QUICK, Config, method_name)
from benchmarks.quality_data import Data, cifar_dir, load_data  # noqa: E402
from benchmarks.quality_methods import prune_ours, prune_torch_pruning, prune_torch_pruning_swin  # noqa: E402
from benchmarks.quality_models import commit_dense, dense_model, latency_table, train_resumable  # noqa: E402
from benchmarks.quality_report import (describe, dims_text, latency_vs_dense,  # noqa: E402
                                        measured_where, report, summarise)
from benchmarks.quality_training import DistilBatches, TeacherCache, accuracy, finetune  # noqa: E402
from models.flops import count_macs  # noqa: E402
from pruning.gates import widths_to_dims  # noqa: E402
from pruning.cost import LatencyTable  # noqa: E402


# ------------------------------------------------------------------------ runs
@dataclass
class Study:
    """What every (method, seed) run shares: the recipe, data, dense model and its logits."""
    cfg: Config
    data: Data
    dense: models.ReViT
    dense_top1: float
    dense_macs: float
    teacher: TeacherCache | None  # None when only (g), which needs no teacher, runs
    table: LatencyTable | None
    work: Path


OURS = {  # method: (criterion, rank cost, scales; None = the reference's)
    "hessian_macs": ("hessian", "macs", None),
    "hessian_latency": ("hessian", "latency", None),
    "hessian_unit_macs": ("hessian", "macs", {"emb": 1.0, "head": 1.0, "qk": 1.0, "v": 1.0,
                                              "mlp": 1.0}),
    "taylor_macs": ("taylor", "macs", None),
    "magnitude_macs": ("magnitude", "macs", None),
    "random_macs": ("random", "macs", None),
}


def measure(s: Study, method: str, budget: float, seed: int, model: models.ReViT,
            top1_pruned: float | None, extra: dict) -> dict:
    """One result row: top-1, params, MACs, dims and CPU latency against the dense model."""
    model = model.eval()
    t1 = time.perf_counter()
    top1 = accuracy(model, s.data, s.cfg.eval_batch)
    eval_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    lat = latency_vs_dense(model, s.dense, s.cfg.img_size, s.cfg.latency_repeats)
    extra = dict(extra)
    times = {**extra.pop("_times", {}), "eval": eval_s, "latency": time.perf_counter() - t1}
    row = {"method": method, "label": METHODS[method][0], "budget": budget, "seed": seed,
           "top1_pruned": top1_pruned, "top1_finetuned": top1,
           **describe(model, s.dense_macs), "latency": lat, **extra, "times_s": times}
    before = "-" if top1_pruned is None else f"{top1_pruned:.2f}%"
    print(f"  -> {METHODS[method][0]} {budget:.2f} seed {seed}: top-1 {before} -> {top1:.2f}%, "
          f"MACs ratio {row['macs_ratio']:.3f}, latency b1 {lat['b1']['median']:.2f} "
          f"b32 {lat['b32']['median']:.2f}", flush=True)
    return row


def finetune_snapshots(s: Study, method: str, seed: int, snaps: dict,
                       budgets: tuple[float, ...]) -> list[dict]:
    """Each of `budgets`' pruned model: top-1, the common finetune, then `measure`."""
    rows = []
    for budget in budgets:
        if budget not in snaps:
            print(f"  {method}: budget {budget} not reached")
            continue
        snap = dict(snaps[budget])
        model = snap.pop("model")
        t1 = time.perf_counter()
        top1_pruned = accuracy(model, s.data, s.cfg.eval_batch)
        ev = time.perf_counter() - t1
        # per seed, the same batches in the same order for every method's finetune
        batches = DistilBatches(s.data, s.teacher, s.cfg.batch_size, s.cfg.hflip, seed + 100)
        t1 = time.perf_counter()
        finetune(model, batches, s.cfg, seed, f"{method} {budget}")
        times = {"prune": snap.pop("seconds", None), "finetune": time.perf_counter() - t1,
                 "eval_pruned": ev}
        rows.append(measure(s, method, budget, seed, model, top1_pruned,
                            {**snap, "_times": times}))
    return rows


def train_uniform(cfg: Config, data: Data, budget: float, seed: int, work: Path) -> dict:
    """(g)'s model at one budget and seed: the dense shape scaled uniformly to `budget` of its
    MACs, trained from scratch by `train_resumable` in `work`. Needs only the dense shape, not
    its weights."""
    dims, epochs = uniform_dims(cfg.dims(), budget), cfg.scratch_epochs()
    key = {**cfg.dense_key(), "dims": dims.to_dict(), "dense_epochs": epochs, "seed": seed}
    return train_resumable(dims, cfg, data, epochs, seed,
                           work / f"uniform_{cfg.data}_{budget}_s{seed}.pth", key,
                           f"uniform {budget} seed {seed}")


def uniform_scratch(s: Study, seed: int, budgets: tuple[float, ...]) -> list[dict]:
    """(g): uniform widths at each budget, trained from scratch (resumably) by the dense recipe
    for the dense model's epochs plus the finetune's."""
    rows, epochs = [], s.cfg.scratch_epochs()
    for budget in budgets:
        ck = train_uniform(s.cfg, s.data, budget, seed, s.work)
        dims = models.dims_from_dict(ck["dims"])
        model = models.model_class(dims)(dims)
        model.load_state_dict(ck["model"])
        rows.append(measure(s, "uniform_scratch", budget, seed, model, None,
                            {"epochs": epochs, "plateau_gain": ck["plateau_gain"],
                             "_times": {"train": ck["seconds"]}}))
    return rows


def run_method(s: Study, method: str, seed: int, threads: int, tag: str = "",
               budgets: tuple[float, ...] = BUDGETS) -> tuple[list[dict], float]:
    """One method at `budgets` for one seed: its rows and the seconds they took. They are
    saved when done and reused by a later run with the same recipe (a stopped study resumes
    here). `tag` names a variant (the lambda sweep's weights) so its rows file is its own."""
    if tuple(budgets) != BUDGETS:
        tag += "_b" + "_".join(f"{b:g}" for b in budgets)
    done = s.work / f"rows_{s.cfg.data}_{method}{tag}_s{seed}.json"
    key = {"config": asdict(s.cfg), "dense_top1": s.dense_top1, "threads": threads, "seed": seed}
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("key") == key:
            print(f"  reusing {done} (measured in an earlier run)")
            return saved["rows"], saved.get("seconds", 0.0)
    t0 = time.perf_counter()
    if method in OURS:
        criterion, cost, scales = OURS[method]
        batches = DistilBatches(s.data, s.teacher, s.cfg.prune_batch, s.cfg.hflip, seed + 10)
        rows = finetune_snapshots(s, method, seed, prune_ours(
            s.dense, criterion, cost, batches, s.cfg, seed, s.table, scales), budgets)
    elif method == "torch_pruning":
        batches = DistilBatches(s.data, s.teacher, s.cfg.prune_batch, s.cfg.hflip, seed + 10)
        tp_prune = prune_torch_pruning_swin if s.cfg.family == "swin" else prune_torch_pruning
        rows = finetune_snapshots(s, method, seed, tp_prune(s.dense, batches, s.cfg, seed),
                                  budgets)
    else:
        rows = uniform_scratch(s, seed, budgets)
    seconds = time.perf_counter() - t0
    env = common.environment()  # each row keeps where and when it was measured
    for r in rows:
        r["environment"] = {k: env[k] for k in ("date", "cpu", "threads", "torch", "timm")}
    write_text_atomic(done, json.dumps({"key": key, "rows": rows, "seconds": seconds}))
    return rows, seconds


def lambda_sweep(s: Study, weights: list[float], seeds: list[int], threads: int) -> list[dict]:
    """(b) at several lambda weights (lambda set at the first prune step so the median latency
    penalty is `weight` x the median score; 0 ranks by saliency alone, i.e. (a)). Each row
    adds the weight and the latency ratio the table predicts for the pruned shape. The
    comparison study's own (b) rows stand for its default weight (same recipe, reused)."""
    rows = []
    for weight in weights:
        sweep = Study(**{**s.__dict__, "cfg": dataclasses.replace(s.cfg, latency_weight=weight)})
        tag = "" if weight == s.cfg.latency_weight else f"_w{weight:g}"
        for seed in seeds:
            print(f"(b) lambda weight {weight:g}, seed {seed}", flush=True)
            rows += [{**r, "latency_weight": weight, "table_latency_ratio": table_ratio(s, r)}
                     for r in run_method(sweep, "hessian_latency", seed, threads, tag=tag)[0]]
    return rows


def reference_rows(s: Study, seeds: list[int], threads: int) -> dict:
    """(a)'s rows per (budget, seed), the sweep's baseline, with the table's latency ratio:
    reused from the comparison study when it ran, pruned here otherwise."""
    return {(r["budget"], r["seed"]): {**r, "table_latency_ratio": table_ratio(s, r)}
            for seed in seeds for r in run_method(s, REFERENCE, seed, threads)[0]}


def table_ratio(s: Study, row: dict) -> float:
    """The latency ratio to the dense model that the latency table predicts for a row's shape."""
    return s.table.total(widths_to_dims(row["dims"], s.dense.dims)) / s.table.total(s.dense.dims)


def lambda_report(rows: list[dict], base: dict, cfg: Config) -> str:
    """Per weight and budget over the seeds: lambda, the shapes, table-predicted and measured
    latency, top-1; and against (a)'s rows of the same seeds (`base`, listed first) whether
    the shape differs and the paired differences in finetuned top-1 and measured latency."""
    headers = ["weight", "budget", "seeds", "lambda", "MACs ratio", "table latency ratio",
               "measured latency/dense b32", "measured b1", "top-1 pruned", "top-1 finetuned",
               "shape differs from (a) (seeds)", "top-1 finetuned − (a) (95% CI)",
               "latency b32 − (a) (95% CI)", "dims (first seed)"]
    groups = [("(a)", list(base.values()))]
    groups += [(f"{w:g}", [r for r in rows if r["latency_weight"] == w])
               for w in sorted({r["latency_weight"] for r in rows})]
    table = []
    for name, group in groups:
        for b in BUDGETS:
            rs = sorted((r for r in group if r["budget"] == b), key=lambda r: r["seed"])
            if not rs:
                continue
            paired = [] if name == "(a)" else [r for r in rs if (b, r["seed"]) in base]
            ref = [base[(b, r["seed"])] for r in paired]
            differs = [r["seed"] for r, a in zip(paired, ref) if r["dims"] != a["dims"]]
            d_top1 = paired_interval([r["top1_finetuned"] - a["top1_finetuned"]
                                      for r, a in zip(paired, ref)])
            d_lat = paired_interval([r["latency"]["b32"]["median"] - a["latency"]["b32"]["median"]
                                     for r, a in zip(paired, ref)])
            table.append([name, f"{b:.2f}", len(rs),
                          f"{statistics.fmean(r['lambda'] for r in rs):.3g}",
                          pm(mean_sd([r["macs_ratio"] for r in rs]), 3),
                          pm(mean_sd([r["table_latency_ratio"] for r in rs]), 3),
                          pm(mean_sd([r["latency"]["b32"]["median"] for r in rs])),
                          pm(mean_sd([r["latency"]["b1"]["median"] for r in rs])),
                          pm(mean_sd([r["top1_pruned"] for r in rs])),
                          pm(mean_sd([r["top1_finetuned"] for r in rs])),
                          f"{len(differs)}/{len(paired)}" if paired else "-",
                          interval_text(d_top1), interval_text(d_lat),
                          dims_text(rs[0]["dims"])])
    return (md_table(headers, table) + "\n\nThe (a) rows are the comparison study's NViT rows "
            "of the same seeds; every other row is (b) (hessian, reference scales, ranked "
            "by score - lambda x the latency-table drop, stopped at the MACs budget) with lambda "
            "set at the first prune step so that the median latency penalty of the next "
            "contenders is `weight` x their median score; weight 0 ranks like (a). The table "
            "predicts from this CPU's latency table (batch 32); measured ratios are medians of "
            "interleaved pairs against the dense model, and differences to (a) are paired by "
            f"seed. Finetune as in the quality study ({cfg.ft_epochs} epochs).")


# --------------------------------------------------------------------------- main
def result_to_keep(study: str, cfg: Config, threads: int) -> dict:
    """For --keep: the study's written result, refused unless it used this recipe and thread
    count (its rows would not compare with this run's)."""
    path = common.RESULTS / f"{study}.json"
    if not path.is_file():
        raise SystemExit(f"--keep: no result at {path} to add to")
    old = json.loads(path.read_text())
    if old.get("config") != asdict(cfg):
        diff = sorted(k for k, v in asdict(cfg).items() if old.get("config", {}).get(k) != v)
        raise SystemExit(f"--keep: {path} used another recipe (differs in {', '.join(diff)})")
    if old["environment"]["threads"] != threads:
        raise SystemExit(f"--keep: {path} ran at {old['environment']['threads']} threads, "
                         f"this run at {threads}: pass --threads {old['environment']['threads']}")
    return old


def report_again(study: str) -> None:
    """The report of a written result, rebuilt from its rows (after the report changed)."""
    path = common.RESULTS / f"{study}.json"
    if not path.is_file():
        raise SystemExit(f"--report-only: no result at {path}")
    old = json.loads(path.read_text())
    cfg = Config(**old["config"])
    dims = models.dims_from_dict(old["dense"]["dims"])
    dense = models.model_class(dims)(dims).eval()
    rows = old["rows"]
    summary = summarise(rows)
    md = report(rows, summary, cfg, dense, old["dense"]["top1"], old["dense"]["macs"],
                old["times_s"], old["n_val"], study)
    data = {k: v for k, v in old.items() if k != "study"}
    written = write_results(study, {**data, "summary": summary}, md, where=measured_where(rows))
    print(md)
    print(f"wrote {written}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["cifar10", "digits"], default=None)
    p.add_argument("--quick", action="store_true", help="tiny DIGITS variant for CI (~3 min)")
    p.add_argument("--family", choices=["vit", "swin"], default="vit",
                   help="swin: the Swin arm, a two-stage Swin on DIGITS with the methods that "
                        "apply to it (results quality_swin[_quick])")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "work" / "quality"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 2; 1 with --quick, whose tiny ops gain nothing)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset (default: all; the Swin arm's: "
                        f"{','.join(SWIN_METHODS)})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated integers")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS),
                   help="comma-separated subset of the MACs budgets to finetune and measure")
    p.add_argument("--keep", action="store_true",
                   help="add to the existing result (same recipe and threads): keep its rows "
                        "and run only the asked-for rows it lacks")
    p.add_argument("--train-only", action="store_true",
                   help="with --methods uniform_scratch: only train (g)'s models into the work "
                        "dir, write no result (several such runs may share a machine at "
                        "--threads 1 each; a later run without it measures them)")
    p.add_argument("--results-dir", default=None,
                   help="where the JSON/Markdown/PNG go (default benchmarks/results)")
    p.add_argument("--dense-only", action="store_true",
                   help="train (or continue training) the dense model, then stop")
    p.add_argument("--uniform-epochs", type=int, default=None,
                   help="(g)'s epochs from scratch (default: the dense model's + the finetune's, "
                        "the issue's equal total; fewer only to smoke-test)")
    p.add_argument("--lambda-sweep", default=None, metavar="W1,W2,...",
                   help="instead of the comparison: (b) at these lambda weights (0 = (a)), "
                        "written to quality_lambda[_quick]")
    p.add_argument("--save-dense", action="store_true",
                   help="copy the trained dense model into benchmarks/models/ with its "
                        "manifest entry (sha256, this command), to be committed")
    p.add_argument("--report-only", action="store_true",
                   help="write the report (Markdown, plots) again from the written result's "
                        "rows, measuring nothing")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_quality " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.results_dir:
        common.RESULTS = Path(args.results_dir)
    swin = args.family == "swin"
    study = ("quality_swin" if swin else "quality") + ("_quick" if args.quick else "")
    if args.report_only:
        report_again(study)
        return
    if args.methods is None:
        args.methods = ",".join(SWIN_METHODS if swin else METHODS)
    methods = [m for m in args.methods.split(",") if m]
    if swin and set(methods) - set(SWIN_METHODS):
        raise SystemExit(f"the Swin arm runs {', '.join(SWIN_METHODS)}, not "
                         f"{', '.join(sorted(set(methods) - set(SWIN_METHODS)))}")
    if swin and (args.data == "cifar10" or args.lambda_sweep):
        raise SystemExit("the Swin arm runs on DIGITS, without a lambda sweep")
    if not methods:
        raise SystemExit("--methods names no method; known: " + ", ".join(METHODS))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds wants comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    try:
        budgets = tuple(b for b in BUDGETS if b in {float(x) for x in args.budgets.split(",")})
    except ValueError:
        budgets = ()
    if len(budgets) != len(args.budgets.split(",")):
        raise SystemExit(f"--budgets wants a comma-separated subset of "
                         f"{','.join(f'{b:g}' for b in BUDGETS)}, got {args.budgets!r}")
    try:
        weights = [float(x) for x in args.lambda_sweep.split(",")] if args.lambda_sweep else []
    except ValueError:
        raise SystemExit(f"--lambda-sweep wants comma-separated numbers, got "
                         f"{args.lambda_sweep!r}") from None
    if args.train_only and methods != ["uniform_scratch"]:
        raise SystemExit("--train-only trains (g)'s models: use it with --methods uniform_scratch")
    modes = [f for f, on in (("--lambda-sweep", args.lambda_sweep),
                             ("--dense-only", args.dense_only), ("--train-only", args.train_only),
                             ("--keep", args.keep)) if on]
    if len(modes) > 1:
        raise SystemExit(f"{' and '.join(modes)} do not combine: choose one")
    if args.lambda_sweep and args.budgets != p.get_default("budgets"):
        raise SystemExit("--lambda-sweep runs every budget: drop --budgets")
    if any(w < 0 for w in weights):
        raise SystemExit("--lambda-sweep weights must be >= 0")
    if "torch_pruning" in methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("torch-pruning is not installed: (h) skipped (pip install -r requirements-bench.txt)")
            methods.remove("torch_pruning")
    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data_kind = args.data
    if data_kind is None:
        if args.quick or swin:
            data_kind = "digits"
        elif (cifar_dir() / "cifar10_train20k.npz").is_file():
            data_kind = "cifar10"
        else:
            data_kind = "digits"
            print(f"note: no CIFAR-10 subset at {cifar_dir()}; using scikit-learn's DIGITS")
    if data_kind == "cifar10" and not (cifar_dir() / "cifar10_train20k.npz").is_file():
        raise SystemExit(f"no CIFAR-10 subset at {cifar_dir()} (see ../shared/data/README); "
                         f"--data digits runs on scikit-learn's DIGITS")
    presets = {(False, False): FULL, (False, True): QUICK, (True, False): SWIN,
               (True, True): SWIN_QUICK}
    cfg = Config(data=data_kind, **presets[(swin, args.quick)])
    if data_kind == "digits" and not args.quick:
        cfg.crop_pad, cfg.hflip = 2, False  # digits are not mirror-symmetric
    if args.uniform_epochs is not None:
        if args.uniform_epochs < 1:
            raise SystemExit(f"--uniform-epochs must be positive, got {args.uniform_epochs}")
        cfg.uniform_epochs = args.uniform_epochs
    work = Path(args.work_dir + ("_swin" if swin else ""))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    data = load_data(data_kind, cfg.img_size, cfg.train_subset)
    times["load_data_s"] = time.perf_counter() - t0
    print(f"data {data_kind}: {len(data.x_train)} train / {len(data.x_val)} val; "
          f"{args.threads} threads; seeds {seeds}")
    if args.train_only:
        for seed in seeds:
            for budget in budgets:
                train_uniform(cfg, data, budget, seed, work)
        return
    old = result_to_keep(study, cfg, args.threads) if args.keep else None
    kept = {(r["method"], r["budget"], r["seed"]): r for r in (old or {}).get("rows", [])}
    todo = {}  # (seed, method): the budgets this run measures
    for seed in seeds:
        for method in methods:
            missing = tuple(b for b in budgets if (method, b, seed) not in kept)
            if missing:
                todo[(seed, method)] = missing
    committed_name = f"{study}_dense_{data_kind}.pth"
    if old is not None and not todo:
        print(f"--keep: {common.RESULTS / study}.json already has every asked-for row; nothing to run")
        return
    # (g) trains from scratch: with the dense top-1 on record, it needs only the dense shape
    needs_dense = (old is None or args.save_dense
                   or any(method != "uniform_scratch" for _, method in todo))
    dense_record = {k: v for k, v in (old or {}).get("dense", {}).items()
                    if k in ("sha256", "curve", "plateau_gain", "train_seconds")}
    if needs_dense:
        dense, dense_top1, dense_record = dense_model(cfg, data, work, times, committed_name)
        if old is not None and old["dense"]["top1"] != dense_top1:
            raise SystemExit(f"--keep: the result's dense model had top-1 "
                             f"{old['dense']['top1']}%, this one {dense_top1}%: its rows do not "
                             f"compare with new ones (only (g) can run without it)")
    else:
        dense, dense_top1 = models.model_class(cfg.dims())(cfg.dims()).eval(), old["dense"]["top1"]
        print(f"dense model: not loaded, only (g) runs; its top-1 {dense_top1:.2f}% is the "
              f"existing result's, its shape the latency reference")
    if args.save_dense:
        commit_dense(work / f"dense_{data_kind}.pth", committed_name, command, cfg.dense_key())
    if args.dense_only:
        return
    teacher = None
    if needs_dense:
        t0 = time.perf_counter()
        teacher = TeacherCache(dense, data.x_train, cfg.eval_batch, cfg.hflip)
        times["teacher_logits_s"] = time.perf_counter() - t0
    table = None
    if any(m == "hessian_latency" for _, m in todo) or weights:
        table = latency_table(cfg, work, dense.dims.num_tokens, times)
    s = Study(cfg, data, dense, dense_top1, count_macs(dense)[0], teacher, table, work)
    if weights:
        rows = lambda_sweep(s, weights, seeds, args.threads)
        base = reference_rows(s, seeds, args.threads)
        times["total_s"] = time.perf_counter() - t_start
        name = study.replace("quality", "quality_lambda")
        path = write_results(name, {"config": asdict(cfg), "data": data_kind, "seeds": seeds,
                                    "weights": weights, "dense_top1": dense_top1,
                                    "dense_sha256": dense_record.get("sha256"), "rows": rows,
                                    "reference_rows": list(base.values()),
                                    "times_s": times}, lambda_report(rows, base, cfg))
        print(path.read_text())
        return

    if old is not None:
        print(f"--keep: keeping the result's {len(kept)} rows, running "
              f"{sum(map(len, todo.values()))} more")
    # seed-major: a stopped study has every method at its first seeds
    for (seed, method), missing in todo.items():
        print(f"{METHODS[method][0]} {method_name(method, cfg.family)}, seed {seed}", flush=True)
        done, seconds = run_method(s, method, seed, args.threads, budgets=missing)
        kept.update({(r["method"], r["budget"], r["seed"]): r for r in done})
        times[f"{method}_s"] = times.get(f"{method}_s", 0.0) + seconds
    rows = list(kept.values())
    seeds = sorted({r["seed"] for r in rows})

    times["total_s"] = time.perf_counter() - t_start
    summary = summarise(rows)
    md = report(rows, summary, cfg, dense, dense_top1, s.dense_macs, times, len(data.x_val),
                study)
    result = {"config": asdict(cfg), "data": data_kind, "n_train": len(data.x_train),
              "n_val": len(data.x_val), "seeds": seeds,
              "dense": {"top1": dense_top1, "macs": s.dense_macs,
                        "params": sum(p.numel() for p in dense.parameters()),
                        "dims": dense.dims.to_dict(), **dense_record},
              "methods": {k: v[1] for k, v in METHODS.items()}, "budgets": list(BUDGETS),
              "summary": summary, "rows": rows, "times_s": times}
    if old is not None:  # where and in how long the kept rows were measured
        result["earlier_runs"] = old.get("earlier_runs", []) + [
            {"environment": old["environment"], "times_s": old["times_s"]}]
    path = write_results(study, result, md, where=measured_where(rows))
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

