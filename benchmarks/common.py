"""Shared measurement helpers for the benchmark studies.

Comparisons are taken in one process, interleaved (A B A B ...), repeated, and reported as
the median ratio with its spread; never a single absolute time. Results go to
benchmarks/results/<study>.json and .md with the date, versions, CPU model and threads.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from atomic import write_text_atomic  # noqa: E402
from benchmarks.passive import malloc_setting  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def study_parser(doc: str, study: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every study shares: --quick, --passive (acted on by passive.py before torch
    loads; parsed here so it is accepted), --threads, --out, --name."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE (sleeping instead of spinning OpenMP threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--name", default=None, help=f"study name (default {study}, {study}_quick)")
    return p


def apply_study_args(args, study: str, set_threads: bool = True) -> str:
    """Set torch's threads and the results directory from the shared flags; the study name."""
    global RESULTS
    if args.threads and set_threads:
        torch.set_num_threads(args.threads)
    if args.out:
        RESULTS = Path(args.out)
    return args.name or (f"{study}_quick" if args.quick else study)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import timm
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "malloc": malloc_setting()}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3,
                inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured A B A B ... so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict:
    """Median of the pairwise ratios, with the 25th-75th percentile spread."""
    ratios = sorted(n / d for n, d in zip(numerator, denominator))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "p25": q[0], "p75": q[2], "n": len(ratios)}


def write_results(study: str, data: dict, table_md: str, where: str | None = None) -> Path:
    """Write RESULTS/<study>.json and .md (atomically); returns the Markdown path. `where`:
    the .md's line on where the figures were measured, when not all in this run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"study": study, "environment": environment(), **data}
    env = payload["environment"]
    header = (f"# {study}\n\n{env['date']} - torch {env['torch']}, timm {env['timm']}, "
              f"{env['cpu']}, {env['threads']} threads\n\n" if where is None else
              f"# {study}\n\n{where}\n\n")
    for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", header + table_md + "\n")):
        write_text_atomic(RESULTS / f"{study}{suffix}", text)
    return RESULTS / f"{study}.md"


def publish(study: str, table_md: str, load_at_start: tuple, quick: bool, **data) -> Path:
    """A study's last step: the machine's state under its table (OpenMP policy, malloc, load
    averages) and beside its data, both files written, the table printed."""
    from benchmarks.passive import machine_note, omp_policy
    table_md += "\n\n" + machine_note(load_at_start)
    path = write_results(study, {"omp_wait_policy": omp_policy(), "quick": quick,
                                 "loadavg": [list(load_at_start), list(os.getloadavg())], **data},
                         table_md)
    print(table_md)
    print(f"wrote {path}")
    return path


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def uniform_dims(base, target: float):
    """Embed, heads and MLP all scaled by one factor (head width kept), closest MACs <= target;
    a Swin's every stage alike."""
    import numpy as np

    import models
    from pruning.cost import MacsCost, build_cost_model
    if isinstance(base, models.SwinDims):
        from dataclasses import replace
        macs = build_cost_model("macs", base)
        full = macs.total(base)
        best = None
        for s in np.linspace(0.05, 1.0, 400):
            d = replace(base, embed_dim=[max(8, int(round(e * s / 8)) * 8) for e in base.embed_dim],
                        num_heads=[max(1, int(round(h * s))) for h in base.num_heads],
                        mlp_dim=[max(8, int(round(m * s / 8)) * 8) for m in base.mlp_dim])
            r = macs.total(d) / full
            if r <= target and (best is None or r > best[0]):
                best = (r, d)
        if best is None:
            raise ValueError(f"no uniform scaling of this Swin reaches {target:.0%} of its MACs")
        return best[1]
    macs = MacsCost(base)
    full = macs.total(base)
    H, hd, E, M = base.num_heads[0], base.qk_dim[0], base.embed_dim, base.mlp_dim[0]
    best = None
    for s in np.linspace(0.05, 1.0, 400):
        e = max(8, int(round(E * s / 8)) * 8)
        h = max(1, int(round(H * s)))
        m = max(8, int(round(M * s / 8)) * 8)
        d = models.Dims.uniform(e, base.depth, h, m, qk_dim=hd, img_size=base.img_size,
                                patch_size=base.patch_size, in_chans=base.in_chans,
                                num_classes=base.num_classes, distilled=base.distilled)
        r = macs.total(d) / full
        if r <= target and (best is None or r > best[0]):
            best = (r, d)
    return best[1]


# ------------------------------------------------------------- over seeds
T_LEVEL = 0.95  # the paired intervals' coverage


def mean_sd(values: list[float | None]) -> dict | None:
    """Mean and sample standard deviation over the seeds (sd None for one seed)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}


def paired_interval(diffs: list[float]) -> dict | None:
    """Mean of seed-paired differences with a two-sided T_LEVEL Student t interval (None
    bounds with fewer than two pairs)."""
    if not diffs:
        return None
    n, m = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": n}
    from scipy.stats import t
    half = float(t.ppf(0.5 + T_LEVEL / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def welch_interval(a: list[float], b: list[float]) -> dict | None:
    """Difference of the means of two independent samples (mean(a) - mean(b)) with a
    two-sided T_LEVEL Welch t interval (unequal variances, Welch-Satterthwaite degrees of
    freedom); for runs that share a seed number but nothing else, so cannot be paired."""
    if not a or not b:
        return None
    m = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"mean": m, "lo": None, "hi": None, "n": len(a), "paired": False}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return {"mean": m, "lo": m, "hi": m, "n": len(a), "paired": False}
    from scipy.stats import t
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(t.ppf(0.5 + T_LEVEL / 2, df)) * math.sqrt(va + vb)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(a), "paired": False}


def pm(stat: dict | None, digits: int = 2) -> str:
    """"mean +- sd" (or the mean alone for one seed, "-" for none)."""
    if stat is None:
        return "-"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def interval_text(iv: dict | None) -> str:
    if iv is None:
        return "-"
    if iv["lo"] is None:
        return f"{iv['mean']:+.2f} (1 seed)"
    return f"{iv['mean']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}]"
