"""Should CPU runs default to OMP_WAIT_POLICY=PASSIVE? Its cost on an idle machine, its gain on a busy one.

    python -m benchmarks.bench_omp_policy [--quick] [--pairs N]

The wait policy is fixed when the OpenMP runtime starts, so the two policies cannot share a
process: this study alternates child processes (default, passive, default, passive, ...),
each timing the same work with the project's model, and reports the median of the pairwise
time ratios passive / default (< 1: passive is faster). The work is our ReViT at DeiT-Ti/224
(inference batch 1 and 16) and at the CPU-sized shape (training step, batch 64). It is
measured twice: on the machine as it is, and with one busy-looping process per core beyond
the first competing for the cores, which is what another job (or a DataLoader worker) does.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import subprocess
import sys
import time

CHILD_FLAG = "--child"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(quick: bool) -> None:
    """Time the work in this process (its OpenMP policy comes from the environment)."""
    import torch
    import torch.nn.functional as F

    import models
    from benchmarks.common import interleaved
    torch.manual_seed(0)
    rep = 3 if quick else 10
    out = {}
    def small_vit(img: int, patch: int, depth: int) -> models.ReViT:
        return models.ReViT(models.Dims.uniform(192, depth, 3, 768, img_size=img,
                                                patch_size=patch, in_chans=3, num_classes=10,
                                                distilled=False))

    shape = "tiny (quick)" if quick else "DeiT-Ti/224"
    ti = (small_vit(32, 8, 2) if quick else models.build_model("deit_tiny_patch16_224")).eval()
    for b in (1, 16):
        x = torch.randn(b, 3, ti.dims.img_size, ti.dims.img_size)
        with torch.inference_mode():
            t = interleaved({"f": lambda: ti(x)}, repeats=rep, warmup=2, inner=5 if b == 1 else 1)
        out[f"{shape} inference b{b}"] = sorted(t["f"])[len(t["f"]) // 2]
    small = small_vit(32, 4, 2 if quick else 4).train()
    opt = torch.optim.AdamW(small.parameters(), lr=1e-4)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(small(x), y).backward()
        opt.step()
    t = interleaved({"f": step}, repeats=rep, warmup=2)
    out[f"{'tiny (quick)' if quick else 'CPU-sized'} training step b64"] = sorted(t["f"])[len(t["f"]) // 2]
    print(json.dumps(out))


def run_child(policy: str, quick: bool) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, "-m", "benchmarks.bench_omp_policy", CHILD_FLAG]
    cmd += ["--quick"] if quick else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child ({policy}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spinners(n: int) -> list[subprocess.Popen]:
    code = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny work, 1 pair (a smoke test)")
    p.add_argument("--pairs", type=int, default=6, help="child-process pairs per condition")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--name", default=None, help="study name (default omp_policy[_quick])")
    args = p.parse_args()
    from pathlib import Path

    from benchmarks import common
    if args.out:
        common.RESULTS = Path(args.out)
    name = args.name or ("omp_policy_quick" if args.quick else "omp_policy")
    pairs = 1 if args.quick else args.pairs
    busy = max(1, (os.cpu_count() or 2) - 1)
    load = os.getloadavg()
    results = {}
    for cond in ("as is", f"{busy} busy process(es)"):
        procs = spinners(busy) if cond != "as is" else []
        try:
            time.sleep(0.5 if procs else 0)
            runs = {"default": [], "passive": []}
            for i in range(pairs):  # alternate which policy goes first in a pair
                for policy in (("default", "passive") if i % 2 == 0 else ("passive", "default")):
                    runs[policy].append(run_child(policy, args.quick))
        finally:
            for pr in procs:
                pr.kill()
                pr.wait()
        results[cond] = runs
    rows, table = [], []
    for cond, runs in results.items():
        for work in runs["default"][0]:
            s = common.ratio_stats([r[work] for r in runs["passive"]],
                                   [r[work] for r in runs["default"]])
            med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
            d = med([r[work] for r in runs["default"]])
            q = med([r[work] for r in runs["passive"]])
            rows.append({"condition": cond, "work": work, "passive_over_default": s,
                         "default_s": d, "passive_s": q})
            table.append([cond, work, f"{s['median']:.2f} ({s['p25']:.2f}-{s['p75']:.2f})",
                          f"{d * 1e3:.1f}", f"{q * 1e3:.1f}"])
    import torch
    md = common.md_table(["machine", "work", "time passive / default (p25-p75)",
                          "default ms", "passive ms"], table)
    md += (f"\n\nMedian of {pairs} pairs of child processes, one per policy, the first of a "
           f"pair alternating; "
           f"each child's time is its median of repeated calls; < 1: passive is faster. "
           f"{torch.get_num_threads()} torch threads; the busy processes are Python busy "
           f"loops. 1-minute load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at "
           f"the end ({os.cpu_count()} cores).")
    path = common.write_results(name, {"quick": args.quick, "pairs": pairs,
                                       "loadavg": [load, os.getloadavg()], "rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    if CHILD_FLAG in sys.argv:
        child("--quick" in sys.argv)
    else:
        main()
