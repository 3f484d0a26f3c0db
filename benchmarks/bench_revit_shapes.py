"""Study 8: do non-uniform shapes run at their MACs? ReViT-T/S against DeiT-Ti/S, block by block.

    python -m benchmarks.bench_revit_shapes [--quick] [--threads N]

ReViT-T (`revit_dims(176)`, 1.135 GMACs) promises 1.11x DeiT-Ti's speed (1.26 GMACs) by its
MACs, ReViT-S (`revit_dims(384)`) likewise against DeiT-S. Both models of a pair are our
`ReViT` at 224 px (so the only difference is the shape), timed interleaved in eval mode
under inference_mode at batch 16. Then, to see where the time goes, every block of each
model is timed alone on its own input (same batch and tokens), as ms per GMAC of that block,
and torch.profiler's self CPU time per operator is averaged over three forwards of each
model.

Headline: speed ratio (DeiT time / ReViT time) against the MACs ratio (DeiT MACs / ReViT MACs).
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import os

import torch
from torch.profiler import ProfilerActivity, profile

import models
from benchmarks import common
from benchmarks.common import interleaved, md_table, ratio_stats
from models.flops import count_macs

STUDY = "revit_shapes"
PAIRS = {  # ReViT EMB -> the DeiT it is compared with
    "ReViT-T vs DeiT-Ti": (176, "deit_tiny_distilled_patch16_224"),
    "ReViT-S vs DeiT-S": (384, "deit_small_distilled_patch16_224"),
}
BATCH = 16


def block_times(model: models.ReViT, x: torch.Tensor, repeats: int, warmup: int) -> list[dict]:
    """Each block alone on the activations it sees in the model: ms and ms per GMAC."""
    with torch.inference_mode():
        h = model.embed_patches(x, None)
        tokens = [model.cls_token, model.dist_token] if model.dist_token is not None else [model.cls_token]
        h = torch.cat([t.expand(h.shape[0], -1, -1) for t in tokens] + [h], 1) + model.pos_embed
        inputs = []
        for blk in model.blocks:
            inputs.append(h)
            h = blk(h)
    _, per_module = count_macs(model, batch=x.shape[0])
    prefix = type(model).__name__
    fns = {i: (lambda b=blk, t=t: b(t)) for i, (blk, t) in enumerate(zip(model.blocks, inputs))}
    with torch.inference_mode():
        times = interleaved(fns, repeats=repeats, warmup=warmup)
    out = []
    d = model.dims
    for i in range(d.depth):
        ms = 1e3 * sorted(times[i])[len(times[i]) // 2]
        gmacs = per_module.get(f"{prefix}.blocks.{i}", 0.0) / 1e9
        out.append({"block": i, "heads": d.num_heads[i], "qk": d.qk_dim[i], "v": d.v_dim[i],
                    "mlp": d.mlp_dim[i], "ms": ms, "gmacs": gmacs, "ms_per_gmac": ms / gmacs})
    return out


def op_profile(model: torch.nn.Module, x: torch.Tensor, top: int = 8) -> list[dict]:
    """Self CPU time per operator over three forwards (after one warm-up)."""
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "ms": e.self_cpu_time_total / 3e3, "share": e.self_cpu_time_total / total,
             "calls": e.count // 3} for e in rows[:top]]


def measure_pair(name: str, emb: int, deit: str, repeats: int, warmup: int, batch: int) -> dict:
    torch.manual_seed(0)
    revit = models.build_model(deit, dims=models.revit_dims(emb)).eval()
    dense = models.build_model(deit).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        t = interleaved({"revit": lambda: revit(x), "deit": lambda: dense(x)},
                        repeats=repeats, warmup=warmup)
    macs = {k: count_macs(m)[0] for k, m in (("revit", revit), ("deit", dense))}
    return {"pair": name, "batch": batch, "revit_dims": revit.dims.to_dict(),
            "gmacs": {k: v / 1e9 for k, v in macs.items()},
            "macs_ratio": macs["deit"] / macs["revit"],
            "speed_ratio": ratio_stats(t["deit"], t["revit"]),
            "blocks": {"revit": block_times(revit, x, repeats, warmup),
                       "deit": block_times(dense, x, repeats, warmup)},
            "ops": {"revit": op_profile(revit, x), "deit": op_profile(dense, x)},
            "times": t}


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "one pair, few repeats (a smoke test, not a result)")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY)
    repeats, warmup, batch = (3, 1, 2) if args.quick else (20, 3, BATCH)
    pairs = list(PAIRS.items())[:1] if args.quick else list(PAIRS.items())
    load = os.getloadavg()
    rows = [measure_pair(n, emb, deit, repeats, warmup, batch) for n, (emb, deit) in pairs]
    md = md_table(["pair", "GMACs ReViT / DeiT", "MACs promise (DeiT / ReViT)",
                   "speed ratio DeiT time / ReViT time (p25-p75)"],
                  [[r["pair"], f"{r['gmacs']['revit']:.3f} / {r['gmacs']['deit']:.3f}",
                    f"{r['macs_ratio']:.3f}",
                    f"{r['speed_ratio']['median']:.3f} ({r['speed_ratio']['p25']:.3f}-"
                    f"{r['speed_ratio']['p75']:.3f})"] for r in rows])
    for r in rows:
        md += f"\n\n### {r['pair']}: blocks alone, batch {batch}, 224 px\n\n"
        md += md_table(["model", "block", "heads x QK / V", "MLP", "GMACs", "ms", "ms per GMAC"],
                       [[m, b["block"], f"{b['heads']} x {b['qk']} / {b['v']}", b["mlp"],
                         f"{b['gmacs']:.4f}", f"{b['ms']:.2f}", f"{b['ms_per_gmac']:.1f}"]
                        for m in ("revit", "deit") for b in r["blocks"][m]])
        md += "\n\nSelf CPU time per operator, one forward:\n\n"
        md += md_table(["model", "operator", "ms", "share", "calls"],
                       [[m, o["op"], f"{o['ms']:.2f}", f"{100 * o['share']:.1f}%", o["calls"]]
                        for m in ("revit", "deit") for o in r["ops"][m]])
    md += (f"\n\nSpeed ratio: median of {repeats} interleaved pairs (p25-p75) of one eval forward "
           f"at batch {batch}; >= the MACs promise means the shape runs at its MACs. Both models "
           f"are nvit's ReViT (DeiT built from its timm name's uniform dims).")
    common.publish(name, md, load, args.quick, rows=rows)


if __name__ == "__main__":
    main()
