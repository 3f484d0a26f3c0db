"""Study 2: does compaction pay off? Measured CPU speedup of pruned models against MACs removed.

    python benchmarks/bench_compaction.py                       # DeiT-Ti/224 pruned to 75/50/25% MACs
    python benchmarks/bench_compaction.py --dense D.pth --pruned P.pth [--name digits]

The synthetic mode prunes a DeiT-Ti-shaped model with the global pruner (magnitude scores,
MACs cost, reference group sizes) so the shapes are the non-uniform ones pruning produces,
then compacts it. For each pruned model it reports latency speedup at batch 1 and 32 over
the dense model (interleaved, median of pairwise ratios) divided by the MACs reduction:
1.0 means real speed follows the arithmetic exactly.
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved, md_table, ratio_stats, write_results

import models
from models.flops import count_macs
from pruning import Gates, Saliency, compact
from pruning.cost import MacsCost
from pruning.pruner import GlobalPruner


def prune_to(dense: models.ReViT, target: float) -> models.ReViT:
    model = models.ReViT(dense.dims)
    model.load_state_dict(dense.state_dict())
    gates = Gates.attach(model)
    pruner = GlobalPruner(gates, Saliency(gates, "magnitude"), MacsCost(model.dims), target,
                          prune_per_iter=10**9)
    pruner.step(model)
    return compact(model).eval()


def measure(dense, pruned: dict, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    dense_macs = count_macs(dense)[0]
    for name, model in pruned.items():
        macs = count_macs(model)[0]
        row = {"model": name, "macs_ratio": macs / dense_macs, "dims": model.dims.to_dict()}
        for b in batches:
            x = torch.randn(b, 3, dense.dims.img_size, dense.dims.img_size)
            with torch.inference_mode():
                t = interleaved({"dense": lambda: dense(x), "pruned": lambda: model(x)},
                                repeats=repeats, warmup=2)
            speed = ratio_stats(t["dense"], t["pruned"])
            row[f"speedup_b{b}"] = speed
            row[f"efficiency_b{b}"] = speed["median"] * row["macs_ratio"]
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", help="checkpoint of the dense model (with --pruned)")
    p.add_argument("--pruned", help="checkpoint of its pruned compact model")
    p.add_argument("--name", default="compaction")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    if args.dense and args.pruned:
        dense = models.build_model("deit_tiny_patch16_224", checkpoint=args.dense).eval()
        pruned = {"pruned": models.build_model("deit_tiny_patch16_224", checkpoint=args.pruned).eval()}
    else:
        dense = models.build_model("deit_tiny_patch16_224").eval()
        pruned = {f"{int(t * 100)}% MACs target": prune_to(dense, t) for t in (0.75, 0.5, 0.25)}
    rows = measure(dense, pruned, batches, args.repeats)
    headers = ["model", "MACs ratio"] + [h for b in batches for h in
                                         (f"speedup b{b} (p25-p75)", f"speedup x MACs ratio b{b}")]
    table = []
    for r in rows:
        line = [r["model"], r["macs_ratio"]]
        for b in batches:
            s = r[f"speedup_b{b}"]
            line += [f"{s['median']:.2f} ({s['p25']:.2f}-{s['p75']:.2f})", r[f"efficiency_b{b}"]]
        table.append(line)
    md = md_table(headers, table)
    md += ("\n\nspeedup = dense latency / pruned latency (median of interleaved pairs); "
           "speedup x MACs ratio = 1.0 when speed follows the MACs removed exactly.")
    path = write_results(args.name, {"dense_dims": dense.dims.to_dict(), "rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
