"""Study 1: is our model as fast as timm's? ReViT with uniform dims against timm's VisionTransformer,
and ReSwin against timm's SwinTransformer.

    python -m benchmarks.bench_speed_vs_timm [--quick] [--threads N]

Both models have the same dims and the same weights: timm's randomly initialised state dict
is written to a file and loaded into ours with `models.build_model(name, checkpoint=FILE)`
(the fused qkv split on the way in, as for any timm/DeiT checkpoint), and the logits of the
two are checked to agree before anything is timed. Then, interleaved (ours, timm, ours,
timm, ...) and repeated:

- inference: eval mode under torch.inference_mode(), one forward pass;
- training: one step of forward, cross entropy, backward and AdamW (one optimizer per model).

at a CPU-sized shape (32 px, patch 4, depth 4, embed 192, 3 heads, batch 64), at the
DeiT-Ti/224 shape (batch 1 and 16 for inference, 8 for training) and at Swin-T/224 (batch
16 for inference, 8 for training). The headline is the
throughput ratio ours/timm = timm's time / our time per pair (median and p25-p75):
1.0 means as fast, below 1.0 means ours is slower. The minor page faults of each call are
counted too: memory freshly mapped from the OS costs kernel time that the arithmetic does not
show (see benchmarks/README.md, Findings).
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import os
import resource
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import models
from benchmarks import common
from benchmarks.common import interleaved, md_table, ratio_stats
STUDY = "speed_vs_timm"
NAME = "deit_tiny_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"

# case -> timm name, timm overrides, inference batches, training batch
CASES = {
    "cpu-sized (32 px, patch 4, depth 4, E 192)": (
        NAME, dict(img_size=32, patch_size=4, depth=4, num_classes=10), [64], 64),
    "DeiT-Ti/224 (patch 16, depth 12, E 192)": (NAME, dict(), [1, 16], 8),
    "Swin-T/224 (window 7, depths 2-2-6-2, E 96-768)": (SWIN, dict(), [16], 8),
}
LOGIT_TOL = 1e-4
QUICK_SWIN = dict(img_size=32, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                  num_classes=10)


def make_pair(name: str, overrides: dict, workdir: Path
              ) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(ours, timm, max |logit difference|), same dims and weights, in eval mode."""
    theirs = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **overrides)
    path = workdir / "timm_state.pth"
    torch.save(theirs.state_dict(), path)
    ours = models.build_model(name, checkpoint=path, **{k: v for k, v in overrides.items()
                                                        if k != "depth"})
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, ours.dims.img_size, ours.dims.img_size)
    with torch.inference_mode():
        diff = (ours(x) - theirs(x)).abs().max().item()
    if not diff < LOGIT_TOL:
        raise SystemExit(f"logits differ by {diff:.3g} (> {LOGIT_TOL}): not the same model")
    return ours, theirs, diff


def counting(fns: dict, faults: dict) -> dict:
    """Wrap each function to add its minor page faults (freshly mapped memory) to faults[k]."""
    def wrap(k, fn):
        def call():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return call
    return {k: wrap(k, fn) for k, fn in fns.items()}


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def measure_case(case: str, name: str, overrides: dict, infer_batches: list[int],
                 train_batch: int, repeats: dict, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    ours, theirs, diff = make_pair(name, overrides, workdir)
    size, classes = ours.dims.img_size, ours.dims.num_classes
    rows = []
    for b in infer_batches:
        x = torch.randn(b, 3, size, size)
        inner = repeats["inner_b1"] if b == 1 else 1
        faults = {"ours": [], "timm": []}
        with torch.inference_mode():
            t = interleaved(counting({"ours": lambda: ours(x), "timm": lambda: theirs(x)}, faults),
                            repeats=repeats["infer"], warmup=repeats["warmup"], inner=inner)
        rows.append(row(case, f"inference b{b}", b, t, diff, faults))
    ours.train(), theirs.train()
    x = torch.randn(train_batch, 3, size, size)
    y = torch.randint(0, classes, (train_batch,))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
            for k, m in (("ours", ours), ("timm", theirs))}
    faults = {"ours": [], "timm": []}
    t = interleaved(counting({"ours": train_step(ours, opts["ours"], x, y),
                              "timm": train_step(theirs, opts["timm"], x, y)}, faults),
                    repeats=repeats["train"], warmup=repeats["warmup"])
    rows.append(row(case, f"training step b{train_batch}", train_batch, t, diff, faults))
    return rows


def row(case: str, mode: str, batch: int, t: dict, diff: float, faults: dict) -> dict:
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"case": case, "mode": mode, "batch": batch,
            "throughput_ratio": ratio_stats(t["timm"], t["ours"]),
            "ours_img_s": batch / med(t["ours"]), "timm_img_s": batch / med(t["timm"]),
            "ours_page_faults": med(faults["ours"]), "timm_page_faults": med(faults["timm"]),
            "max_logit_diff": diff, "times": t}


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "few repeats (a smoke test, not a result)")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY)
    repeats = (dict(infer=3, train=3, warmup=1, inner_b1=2) if args.quick else
               dict(infer=30, train=20, warmup=3, inner_b1=10))
    rows = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for case, (timm_name, overrides, batches, train_batch) in CASES.items():
            if args.quick and timm_name == SWIN:  # Swin-T/224 is the slow one; the smoke
                case, overrides, batches, train_batch = "Swin, tiny (smoke test)", QUICK_SWIN, [4], 4
            rows += measure_case(case, timm_name, overrides, batches, train_batch, repeats,
                                 Path(tmp))
    table = []
    for r in rows:
        s = r["throughput_ratio"]
        table.append([r["case"], r["mode"], f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})",
                      f"{r['ours_img_s']:.1f}", f"{r['timm_img_s']:.1f}",
                      f"{r['ours_page_faults']:.0f} / {r['timm_page_faults']:.0f}",
                      f"{r['max_logit_diff']:.1e}"])
    md = md_table(["shape", "measured", "throughput ours/timm (p25-p75)", "ours img/s",
                   "timm img/s", "page faults per call ours / timm", "max logit diff"], table)
    md += (f"\n\nRatio = timm time / our time per interleaved pair, median of {repeats['infer']} "
           f"(inference) or {repeats['train']} (training) pairs; < 1 means ours is slower. img/s "
           f"are medians for context only. Same weights (timm's state dict loaded into ours); "
           f"logits checked to agree first. {torch.get_num_threads()} torch threads. Page "
           f"faults: median minor page faults per call, i.e. 4 KB pages the allocator took "
           f"freshly from the OS (kernel time on top of the arithmetic).")
    common.publish(name, md, load, args.quick, rows=rows)


if __name__ == "__main__":
    main()
