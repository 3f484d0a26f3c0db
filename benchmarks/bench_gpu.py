"""Study 11: the GPU study, one command, meant to finish in under 8 minutes on one GPU.

    python -m benchmarks.bench_gpu [--device cuda:0]       # skips cleanly without CUDA
    python -m benchmarks.bench_gpu --device cpu --quick    # the study's code on the CPU, tiny

Every number comes from the code we ship, on the device chosen:

1. ours vs timm: DeiT-S/224 and DeiT-B/224 with the same weights (timm's random init loaded
   into ours; logits checked first), a training step (forward, loss, backward, AdamW) under
   fp16 AMP with a GradScaler and under bf16 AMP, and inference under AMP at batch 1 and
   256; throughput ratio ours/timm (timm's time / ours, median of interleaved pairs) and the
   step's peak memory.
2. a pruning-loop step against a plain step (DeiT-S/224, fp16 and bf16): the shipped
   `engine.train_one_epoch` over the same batches, the pruning variant with gates attached
   (a quarter of every kind of unit removed) and `pruning.loop.PruningLoop` collecting the
   saliency after each backward, as nvit_prune.py runs between prune steps; time ratio and
   peak memory.
3. compact against dense: DeiT-B/224 pruned through the gates to random per-block widths at
   75%, 50% and 25% of its MACs and compacted (`pruning.compact`), timed against the dense
   model by the shipped speed report (`pruning.latency.speed_report`) at batch 1 and 256
   under fp16 AMP, beside what the MACs ratio and a latency table measured on this GPU
   (`pruning.latency.measure_table`, a coarse grid over the widths that occur) predict.
4. which SDPA kernel the model's attention runs for equal and unequal QK/V widths per dtype:
   the aten op the profiler sees inside `models.revit.attention` (flash, memory-efficient,
   cuDNN or math), with the padding the model applies and without it.

Results: benchmarks/results/gpu.{json,md} (gpu_quick with --quick). Timings synchronise the
device after each call; ratios are medians of interleaved pairs with p25-p75.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import contextlib
import copy
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import builders
import engine
import models
from benchmarks import common
from benchmarks.bench_compaction import prune_to
from benchmarks.bench_prune_overhead import loss_args
from benchmarks.bench_step_memory import pruning_loop_hooks, step_peak_bytes
from benchmarks.common import md_table, ratio_stats
from models.revit import attention

from pruning.cost import LatencyTable
from pruning.latency import measure_table, speed_report

STUDY = "gpu"
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}
# case -> (timm name, overrides); sizes of the full study and of --quick (CPU-sized)
FULL = {"models": {"DeiT-S/224": ("deit_small_patch16_224", {}),
                   "DeiT-B/224": ("deit_base_patch16_224", {})},
        "train_batch": 64, "infer_batches": (1, 256), "prune_model": "DeiT-S/224",
        "compact_model": "DeiT-B/224", "targets": (0.75, 0.5, 0.25), "repeats": 20,
        "warmup": 3, "steps": 4, "table_repeats": 5, "pairs": 6, "speed_repeats": 2}
# The time budget (< 8 min on one GPU), counted in forwards: the speed report's timer runs 2
# warm-up and speed_repeats samples of 10 queued forwards per call, so 6 pairs of DeiT-B at
# batch 256 are about 2 x 6 x 22 forwards per pruned shape; a table point is 3 + 5 x 10.
QUICK = {"models": {"tiny DeiT (32 px, patch 8, depth 2, E 96)":
                    ("deit_small_patch16_224",
                     dict(img_size=32, patch_size=8, depth=2, embed_dim=96, num_classes=10))},
         "train_batch": 8, "infer_batches": (1, 8), "prune_model": None, "compact_model": None,
         "targets": (0.75, 0.5, 0.25), "repeats": 3, "warmup": 1, "steps": 2,
         "table_repeats": 2, "pairs": 3, "speed_repeats": 2}
# (QK, V) head widths: DeiT's, ReViT-T/S blocks, pruned pairs, odd, beyond flash's 256
SDPA_WIDTHS = [(64, 64), (16, 64), (32, 64), (24, 40), (40, 24), (5, 12), (264, 136)]
SDPA_OPS = {  # the aten op SDPA dispatched to -> the kernel's name
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_attention_math": "math",
}
LOGIT_TOL = 1e-4


def synced(fn, device: torch.device):
    """fn, then wait for the device: a call's wall time is then its time on the device."""
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def model_pair(name: str, overrides: dict, device: torch.device, workdir: Path):
    """(ours, timm) with the same weights on `device`, their logits checked to agree: timm's
    model for the name (with the overrides) and ours loaded from its state dict, as a user's
    timm checkpoint loads."""
    theirs = timm.create_model(name, pretrained=False, **overrides)
    path = workdir / "timm_state.pth"
    torch.save(theirs.state_dict(), path)
    ours = models.build_model(name, checkpoint=path)
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
    x = torch.randn(2, 3, ours.dims.img_size, ours.dims.img_size, device=device)
    with torch.inference_mode():
        diff = (ours(x) - theirs(x)).abs().max().item()
    if not diff < LOGIT_TOL:
        raise SystemExit(f"{name}: logits differ by {diff:.3g} (> {LOGIT_TOL}): not the same model")
    return ours, theirs, diff


def amp_step(model, optimizer, scaler, x, y, dtype):
    """One AMP training step as DeiT's loop takes it (GradScaler for fp16 only)."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return step


def ours_vs_timm(case: str, name: str, overrides: dict, device, cfg: dict, workdir: Path,
                 precisions: dict) -> list[dict]:
    torch.manual_seed(0)
    ours, theirs, diff = model_pair(name, overrides, device, workdir)
    size, classes = ours.dims.img_size, ours.dims.num_classes
    rows = []
    for prec, dtype in precisions.items():
        for b in cfg["infer_batches"]:
            x = torch.randn(b, 3, size, size, device=device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
                t = common.interleaved({k: synced(lambda m=m: m(x), device)
                                        for k, m in (("ours", ours), ("timm", theirs))},
                                       repeats=cfg["repeats"], warmup=cfg["warmup"])
            rows.append(pair_row(case, f"inference b{b}", prec, b, t, diff))
        b = cfg["train_batch"]
        x = torch.randn(b, 3, size, size, device=device)
        y = torch.randint(0, classes, (b,), device=device)
        steps, peaks = {}, {}
        for key, m in (("ours", ours), ("timm", theirs)):
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
            steps[key] = amp_step(m, opt, engine.make_grad_scaler(device, dtype), x, y, dtype)
            steps[key]()  # optimizer state exists before the peak is taken
            peaks[key] = step_peak_bytes(steps[key], device)
        t = common.interleaved({k: synced(s, device) for k, s in steps.items()},
                               repeats=cfg["repeats"], warmup=cfg["warmup"])
        rows.append({**pair_row(case, f"training step b{b}", prec, b, t, diff),
                     "ours_peak_mib": peaks["ours"] / 2**20, "timm_peak_mib": peaks["timm"] / 2**20})
        ours.eval(), theirs.eval()
    return rows


def pair_row(case, mode, prec, batch, t, diff) -> dict:
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"section": "ours vs timm", "case": case, "mode": mode, "precision": prec,
            "batch": batch, "throughput_ratio": ratio_stats(t["timm"], t["ours"]),
            "ours_img_s": batch / med(t["ours"]), "timm_img_s": batch / med(t["timm"]),
            "max_logit_diff": diff, "times": t}


def pruning_step(case: str, name: str, overrides: dict, device, cfg: dict,
                 precisions: dict, workdir: Path) -> list[dict]:
    """engine.train_one_epoch plain against with gates and the PruningLoop's hooks."""
    torch.manual_seed(0)
    dense = model_pair(name, overrides, device, workdir)[0]
    full = builders.frozen_copy(dense)
    args = loss_args()
    b, size = cfg["train_batch"], dense.dims.img_size
    batches = [(torch.randn(b, 3, size, size, device=device),
                torch.randint(0, dense.dims.num_classes, (b,), device=device))
               for _ in range(cfg["steps"])]
    rows = []
    for prec, dtype in precisions.items():
        criterion = builders.build_criterion(args, dense.dims.num_classes, None, device,
                                             kl_tau=args.kl_tau, per_head=False, full_model=full)
        criterion.kl_enabled = True
        runs, peaks = {}, {}
        for variant in ("plain", "pruning"):
            model = copy.deepcopy(dense).train()
            optimizer = builders.build_optimizer(args, model)
            scaler = engine.make_grad_scaler(device, dtype)
            hooks = {}
            if variant == "pruning":
                _, hooks = pruning_loop_hooks(model, criterion, optimizer, len(batches))

            def run(model=model, optimizer=optimizer, scaler=scaler, hooks=hooks):
                with contextlib.redirect_stdout(io.StringIO()):  # the engine's epoch line
                    engine.train_one_epoch(model, criterion, batches, optimizer, device, 0,
                                           grad_scaler=scaler, amp_dtype=dtype,
                                           print_freq=10**9, **hooks)
            run()
            peaks[variant] = step_peak_bytes(run, device)
            runs[variant] = synced(run, device)
        t = common.interleaved(runs, repeats=cfg["repeats"], warmup=1)
        rows.append({"section": "pruning step", "case": case, "precision": prec, "batch": b,
                     "steps_per_sample": len(batches),
                     "pruning_over_plain": ratio_stats(t["pruning"], t["plain"]),
                     "plain_peak_mib": peaks["plain"] / 2**20,
                     "pruning_peak_mib": peaks["pruning"] / 2**20, "times": t})
    return rows


def table_grid(all_dims: list[models.Dims]) -> dict[str, list[int]]:
    """A coarse latency-table grid spanning every width the models have (at most 4 values per
    axis, ends included: the table interpolates between them)."""
    def axis(values) -> list[int]:
        v = sorted(set(values))
        if len(v) <= 4:
            return v
        return sorted({v[round(i * (len(v) - 1) / 3)] for i in range(4)})
    return {"embed_dims": axis(d.embed_dim for d in all_dims),
            "heads": axis(h for d in all_dims for h in d.num_heads),
            "qk_dims": axis(q for d in all_dims for q in d.qk_dim),
            "v_dims": axis(v for d in all_dims for v in d.v_dim),
            "mlp_dims": axis(m for d in all_dims for m in d.mlp_dim)}


def compact_speedups(case: str, name: str, overrides: dict, device, cfg: dict,
                     dtype, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    dense = model_pair(name, overrides, device, workdir)[0]
    compacts = {t: prune_to(dense, t).to(device).eval() for t in cfg["targets"]}
    grid = table_grid([dense.dims, *(m.dims for m in compacts.values())])
    rows = []
    for b in cfg["infer_batches"]:
        with contextlib.redirect_stdout(io.StringIO()):  # the table's progress lines
            table = LatencyTable.from_dict(measure_table(
                grid, device, b, dense.dims.num_tokens, warmup=cfg["warmup"],
                repeats=cfg["table_repeats"], amp_dtype=dtype, model_dims=dense.dims,
                token_scale=dense.dims.token_scale))
        for t, m in compacts.items():
            r = speed_report(dense, m, device, b, dtype, cfg["pairs"], cfg["speed_repeats"], table)
            rows.append({"section": "compact vs dense", "case": case, "target": t,
                         "dims": m.dims.to_dict(), "grid": grid, **r})
    return rows


def sdpa_kernel_used(dq: int, dv: int, dtype, device, pad: bool, heads: int = 3,
                     tokens: int = 197, batch: int = 2) -> str:
    """The kernel SDPA dispatches to inside the model's attention (the profiler's aten op)."""
    from torch.profiler import ProfilerActivity, profile
    q, k = (torch.randn(batch, heads, tokens, dq, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, heads, tokens, dv, device=device, dtype=dtype)
    with contextlib.redirect_stderr(io.StringIO()), profile(activities=[ProfilerActivity.CPU]) as p:
        try:
            attention(q, k, v, 0.0, dq ** -0.5, pad=pad)
        except RuntimeError as e:
            return f"none ({str(e).splitlines()[0][:60]})"
    names = {e.name.removeprefix("aten::") for e in p.events()}
    found = [kernel for op, kernel in SDPA_OPS.items() if op in names]
    return found[0] if found else "unknown"


def sdpa_rows(device, precisions: dict) -> list[dict]:
    dtypes = {**precisions, "fp32": torch.float32}
    return [{"section": "sdpa kernel", "qk": dq, "v": dv, "precision": prec,
             "kernel_padded": sdpa_kernel_used(dq, dv, dtype, device, pad=True),
             "kernel_unpadded": sdpa_kernel_used(dq, dv, dtype, device, pad=False)}
            for dq, dv in SDPA_WIDTHS for prec, dtype in dtypes.items()]


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": str(device), "name": common.cpu_model()}
    p = torch.cuda.get_device_properties(device)
    return {"device": str(device), "name": p.name, "memory_gib": p.total_memory / 2**30,
            "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "driver_count": torch.cuda.device_count()}


def fmt(s: dict) -> str:
    return f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})"


def tables(rows: list[dict]) -> str:
    sec = lambda name: [r for r in rows if r["section"] == name]  # noqa: E731
    parts = ["## ours vs timm\n", md_table(
        ["model", "step", "precision", "ours / timm throughput (p25-p75)", "ours img/s",
         "timm img/s", "peak MiB ours / timm"],
        [[r["case"], r["mode"], r["precision"], fmt(r["throughput_ratio"]),
          f"{r['ours_img_s']:.0f}", f"{r['timm_img_s']:.0f}",
          f"{r['ours_peak_mib']:.0f} / {r['timm_peak_mib']:.0f}" if "ours_peak_mib" in r else "-"]
         for r in sec("ours vs timm")])]
    parts += ["\n\n## pruning-loop step vs plain step\n", md_table(
        ["model", "precision", "batch", "pruning / plain step time (p25-p75)",
         "peak MiB plain / pruning"],
        [[r["case"], r["precision"], r["batch"], fmt(r["pruning_over_plain"]),
          f"{r['plain_peak_mib']:.0f} / {r['pruning_peak_mib']:.0f}"]
         for r in sec("pruning step")])]
    parts += ["\n\n## compact vs dense\n", md_table(
        ["model", "target", "MACs ratio", "batch", "measured speedup (p25-p75)",
         "promised by MACs", "by the latency table"],
        [[r["case"], r["target"], f"{r['macs_ratio']:.3f}", r["batch_size"],
          f"{r['speedup']:.2f}x ({r['speedup_p25']:.2f}-{r['speedup_p75']:.2f})",
          f"{r['macs_speedup']:.2f}x", f"{r['table_speedup']:.2f}x"]
         for r in sec("compact vs dense")])]
    parts += ["\n\n## SDPA kernel by head widths\n", md_table(
        ["QK", "V", "precision", "kernel (as the model pads)", "kernel (unpadded)"],
        [[r["qk"], r["v"], r["precision"], r["kernel_padded"], r["kernel_unpadded"]]
         for r in sec("sdpa kernel")])]
    return "".join(parts)


def run_study(device: torch.device, cfg: dict, precisions: dict) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case, (name, overrides) in cfg["models"].items():
            rows += ours_vs_timm(case, name, overrides, device, cfg, work, precisions)
        case = cfg["prune_model"] or next(iter(cfg["models"]))
        rows += pruning_step(case, *cfg["models"][case], device, cfg, precisions, work)
        case = cfg["compact_model"] or next(iter(cfg["models"]))
        rows += compact_speedups(case, *cfg["models"][case], device, cfg,
                                 next(iter(precisions.values())), work)
    rows += sdpa_rows(device, precisions)
    return rows


def main() -> int:
    p = common.study_parser(__doc__, STUDY, "tiny shapes and few repeats (runs the study's "
                                            "code, on the CPU too; not a result)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or (with --quick) cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device here; this study needs a GPU (--device cpu --quick "
              "runs its code on the CPU)")
        return 0
    if device.type != "cuda" and not args.quick:
        print(f"error: the full study times GPUs; on {device.type} run it with --quick",
              file=sys.stderr)
        return 2
    name = common.apply_study_args(args, STUDY)
    cfg = QUICK if args.quick else FULL
    load = os.getloadavg()
    start = time.perf_counter()
    rows = run_study(device, cfg, PRECISIONS)
    md = tables(rows)
    md += (f"\n\nDevice: {device_info(device)['name']}. Medians of {cfg['repeats']} interleaved "
           f"repeats (p25-p75), the device synchronised after each call; training step batch "
           f"{cfg['train_batch']}; compact-vs-dense under {next(iter(PRECISIONS))} AMP with "
           f"a latency table measured here at the same batch.")
    common.publish(name, md, load, args.quick, device=device_info(device),
                   seconds=time.perf_counter() - start, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
