"""Study 2: does compaction pay off? Measured CPU speedup of pruned models against MACs removed.

    python -m benchmarks.bench_compaction                       # DeiT-Ti/224 at 75/50/25% MACs
    python -m benchmarks.bench_compaction --family swin         # Swin-T/224 at 50% MACs
    python -m benchmarks.bench_compaction --dense D.pth --pruned P.pth [--name digits]

The synthetic mode takes a DeiT-Ti/224 model and, for each target, removes units of all five
kinds (embedding channels, heads, QK dims, V dims, MLP neurons) through the gates, with
seeded random keep fractions per block and kind scaled until the MACs ratio meets the
target, then compacts it: widths that differ from block to block and kind to kind, as
pruning produces, without pretending that a randomly initialised model has a meaningful
saliency (the quality study measures the shapes real criteria pick). Uniform width scaling
to the same MACs is measured alongside as the reference a plain smaller DeiT would give. For
each model: latency speedup at batch 1 and 32 over the dense model (interleaved, median of
pairwise ratios) times the MACs ratio; 1.0 means real speed follows the arithmetic exactly.
`--family swin` does the same to Swin-T/224 at 50% of its MACs, each stage's embedding with
its own keep fraction.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import os

import torch

import models
from benchmarks import common
from benchmarks.common import (
    interleaved,
    md_table,
    ratio_stats,
    uniform_dims,
)
from errors import UserError
from models.flops import count_macs
from pruning import Gates, compact
from pruning.cost import build_cost_model
from pruning.gates import widths_to_dims

GROUPS = {"emb": 16, "qk": 8, "v": 8, "mlp": 16}  # reference group sizes; heads: any count >= 1
SWIN = "swin_tiny_patch4_window7_224"


def random_widths(dims, target: float, seed: int) -> dict:
    """Per-block, per-kind widths (and per-stream embedding widths): seeded keep fractions
    times one factor, bisected so the MACs ratio is the largest not above `target`; channel
    widths in multiples of GROUPS."""
    gen = torch.Generator().manual_seed(seed)
    frac = {k: (0.4 + 0.6 * torch.rand(dims.depth, generator=gen)).tolist()
            for k in ("num_heads", "qk_dim", "v_dim", "mlp_dim")}
    frac_emb = (0.6 + 0.4 * torch.rand(len(dims.streams), generator=gen)).tolist()
    cost = build_cost_model("macs", dims)
    full = cost.total(dims)

    def snap(n: float, g: int, top: int) -> int:
        return int(min(top, max(g, round(n / g) * g)))

    def widths(s: float) -> dict:
        w = {"embed_dim": dims.embed_value([snap(e * min(1.0, f * s), GROUPS["emb"], e)
                                            for e, f in zip(dims.streams, frac_emb)])}
        w["num_heads"] = [max(1, min(h, round(h * min(1.0, f * s))))
                          for h, f in zip(dims.num_heads, frac["num_heads"])]
        for k, g in (("qk_dim", "qk"), ("v_dim", "v"), ("mlp_dim", "mlp")):
            w[k] = [snap(n * min(1.0, f * s), GROUPS[g], n)
                    for n, f in zip(getattr(dims, k), frac[k])]
        return w

    lo, hi = 0.0, 1.0 / min(frac_emb + [f for v in frac.values() for f in v])
    for _ in range(40):
        mid = (lo + hi) / 2
        ratio = cost.total(widths_to_dims(widths(mid), dims)) / full
        lo, hi = (mid, hi) if ratio <= target else (lo, mid)
    if cost.total(widths_to_dims(widths(lo), dims)) / full > target:
        raise ValueError(f"{target:.0%} of the MACs is below what the minimum widths allow")
    return widths(lo)


@torch.no_grad()
def prune_to(dense, target: float, seed: int = 0):
    """The dense model with units removed through the gates to `random_widths`, compacted."""
    model = models.model_class(dense.dims)(dense.dims)
    model.load_state_dict(dense.state_dict())
    gates = Gates.attach(model)
    w = random_widths(dense.dims, target, seed)
    embs = w["embed_dim"] if isinstance(w["embed_dim"], list) else [w["embed_dim"]]
    for gate, width in zip(gates.embs, embs):
        gate[width:] = 0
    for i, b in enumerate(gates.blocks):
        b["head"][w["num_heads"][i]:] = 0
        b["qk"][:, w["qk_dim"][i]:] = 0
        b["v"][:, w["v_dim"][i]:] = 0
        b["mlp"][w["mlp_dim"][i]:] = 0
    return compact(model).eval()


def uniform(dense, target: float):
    dims = uniform_dims(dense.dims, target)
    return models.model_class(dims)(dims).eval()


def measure(dense, pruned: dict, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    dense_macs = count_macs(dense)[0]
    for name, model in pruned.items():
        macs = count_macs(model)[0]
        row = {"model": name, "macs_ratio": macs / dense_macs, "dims": model.dims.to_dict(),
               "params": sum(p.numel() for p in model.parameters())}
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


def dims_text(d: dict) -> str:
    return (f"E{d['embed_dim']} H{d['num_heads']} qk{d['qk_dim']} v{d['v_dim']} "
            f"mlp{d['mlp_dim']}").replace(" ", "")


def swin_dense(quick: bool):
    """Swin-T/224, or its tiny stand-in for the smoke test."""
    if quick:
        return models.build_model(SWIN, img_size=32, window_size=4, embed_dim=32, depths=(2, 2),
                                  num_heads=(2, 4), num_classes=10).eval()
    return models.build_model(SWIN).eval()


def main() -> None:
    p = common.study_parser(__doc__, "compaction",
                            "a small 32 px model and few repeats (a smoke test, not a result)")
    p.add_argument("--family", choices=("vit", "swin"), default="vit",
                   help="synthetic mode: DeiT-Ti/224 (vit) or Swin-T/224 (swin) pruned")
    p.add_argument("--dense", help="checkpoint of the dense model (with --pruned)")
    p.add_argument("--pruned", help="checkpoint of its pruned compact model")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    if bool(args.dense) != bool(args.pruned):
        p.error("--dense and --pruned go together")
    name = common.apply_study_args(args, "compaction" if args.family == "vit" or args.dense
                                   else "compaction_swin")
    batches = [int(b) for b in args.batches.split(",")]
    repeats = 3 if args.quick else args.repeats
    load = os.getloadavg()
    torch.manual_seed(0)
    if args.dense:
        try:
            dense = models.build_model("deit_tiny_patch16_224", checkpoint=args.dense).eval()
            pruned = {"pruned": models.build_model("deit_tiny_patch16_224",
                                                   checkpoint=args.pruned).eval()}
        except UserError as e:
            raise SystemExit(f"error: {e}")
    elif args.family == "swin":
        dense = swin_dense(args.quick)
        pruned = {"pruned shape, 50% MACs target": prune_to(dense, 0.5),
                  "uniform scaling, 50% MACs target": uniform(dense, 0.5)}
    else:
        if args.quick:  # DeiT-Ti's widths, 3 blocks, 32 px
            dense = models.ReViT(models.Dims.uniform(192, 3, 3, 768, img_size=32, patch_size=4,
                                                     in_chans=3, num_classes=10,
                                                     distilled=False)).eval()
        else:
            dense = models.build_model("deit_tiny_patch16_224").eval()
        pruned = {}
        for t in (0.75, 0.5, 0.25):
            pruned[f"pruned shape, {int(t * 100)}% MACs target"] = prune_to(dense, t)
            pruned[f"uniform scaling, {int(t * 100)}% MACs target"] = uniform(dense, t)
    rows = measure(dense, pruned, batches, repeats)
    headers = ["model", "MACs ratio"] + [h for b in batches for h in
                                         (f"speedup b{b} (p25-p75)", f"speedup x MACs ratio b{b}")]
    table = []
    for r in rows:
        line = [r["model"], r["macs_ratio"]]
        for b in batches:
            s = r[f"speedup_b{b}"]
            line += [f"{s['median']:.2f} ({s['p25']:.2f}-{s['p75']:.2f})", r[f"efficiency_b{b}"]]
        table.append(line + [dims_text(r["dims"])])
    md = md_table(headers + ["dims"], table)
    md += (f"\n\nspeedup = dense latency / pruned latency (median of {repeats} interleaved pairs); "
           "speedup x MACs ratio = 1.0 when speed follows the MACs removed exactly. "
           f"Dense: {dims_text(dense.dims.to_dict())}, {dense.dims.img_size} px, "
           f"patch {dense.dims.patch_size}.")
    common.publish(name, md, load, args.quick, dense_dims=dense.dims.to_dict(), rows=rows)


if __name__ == "__main__":
    main()
