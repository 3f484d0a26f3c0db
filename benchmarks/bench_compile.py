"""Study 10: torch.compile against eager for a training step and a pruning step on the CPU.

    python -m benchmarks.bench_compile [--quick] [--backend inductor] [--threads N]

Two copies of one distilled model with the same weights and their own optimizer
(builders.build_optimizer: timm AdamW), the same batches and loss (builders.build_criterion:
KL to the frozen full model + DeiT loss, as study 3); one runs eager, the other as
`builders.compile_model` compiles it for --torchcompile (after the same warm-up, so the
compilation is not timed; its seconds are reported apart). Each variant runs the shipped
`engine.train_one_epoch` over the same batches, timed interleaved, in fp32 and under bf16
autocast:

- training step: what revit_scratch.py runs (no gates);
- pruning step: what nvit_prune.py runs between prune steps: gates attached with a quarter
  of the embedding channels and of every block's heads, QK, V and MLP units removed (the
  live-channel LayerNorm active) and a `PruningLoop` collecting the saliency after each
  backward. Then one more unit is removed, as a prune step does, and the study checks that
  the compiled model did not recompile (dynamo's graph count).

Headline: step time compiled / eager (median of pairs, p25-p75; < 1: compiled faster).
--quick runs a CPU-sized model in fp32 with the aot_eager backend (the dynamo and autograd
tracing without inductor's C++ build), to exercise the study's code in seconds.
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
import time
from types import SimpleNamespace

import torch
from torch._dynamo.utils import counters

import builders
import engine
from benchmarks import common
from benchmarks.bench_prune_overhead import NAME, loss_args, make_dense, timed
from benchmarks.bench_step_memory import pruning_loop_hooks
from benchmarks.common import md_table, ratio_stats

STUDY = "compile"
CASES = {  # name -> (frame, batch)
    "DeiT-Ti/224 distilled": (dict(num_classes=1000), 8),
}
QUICK_CASES = {
    "cpu-sized (32 px, patch 4, depth 2, E 192)": (
        dict(img_size=32, patch_size=4, num_classes=10, depth=2), 16),
}


def measure_case(case: str, frame: dict, batch: int, backend: str, amp_dtype, repeats: int,
                 warmup: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    dense = make_dense(NAME, frame)
    full = builders.frozen_copy(dense)  # the KL's full model, as nvit_prune.py makes it
    args = loss_args()
    cpu = torch.device("cpu")
    nb_classes = dense.dims.num_classes
    size = dense.dims.img_size
    batches = [(torch.randn(batch, 3, size, size), torch.randint(0, nb_classes, (batch,)))
               for _ in range(steps)]
    compile_args = SimpleNamespace(torchcompile=backend, torchcompile_mode=None)
    rows = []
    for variant in ("training step", "pruning step"):
        criterion = builders.build_criterion(args, nb_classes, None, cpu, kl_tau=args.kl_tau,
                                             per_head=False, full_model=full)
        criterion.kl_enabled = True
        runs, first_call, graphs = {}, {}, {}
        for mode in ("eager", "compiled"):
            model = copy.deepcopy(dense).train()
            optimizer = builders.build_optimizer(args, model)
            hooks, gates = {}, None
            if variant == "pruning step":
                gates, hooks = pruning_loop_hooks(model, criterion, optimizer, steps)
            net = builders.compile_model(compile_args, model) if mode == "compiled" else model

            def run(net=net, optimizer=optimizer, hooks=hooks):
                with contextlib.redirect_stdout(io.StringIO()):  # the engine's epoch line
                    engine.train_one_epoch(net, criterion, batches, optimizer, cpu, 0,
                                           amp_dtype=amp_dtype, print_freq=10**9, **hooks)
            before = counters["stats"]["unique_graphs"]
            first_call[mode] = timed(run)  # compiles here
            if gates is not None and mode == "compiled":  # a prune step: values, no shapes
                compiled_graphs = counters["stats"]["unique_graphs"]
                gates.remove("mlp", 0, [gates.dims.mlp_dim[0] - 1])
                gates.remove("emb", 0, [gates.dims.embed_dim - 1])
                run()
                graphs["recompiled_after_prune_step"] = \
                    counters["stats"]["unique_graphs"] - compiled_graphs
            graphs[f"{mode}_graphs"] = counters["stats"]["unique_graphs"] - before
            runs[mode] = run
        times = common.interleaved(runs, repeats=repeats, warmup=warmup)
        rows.append({
            "case": case, "variant": variant, "batch": batch, "backend": backend,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "steps_per_epoch": steps, "dims": dense.dims.to_dict(),
            "compiled_over_eager": ratio_stats(times["compiled"], times["eager"]),
            "compile_seconds": first_call["compiled"] - first_call["eager"],
            "eager_step_s": sorted(times["eager"])[len(times["eager"]) // 2] / steps,
            **graphs, "times": times})
    return rows


def fmt(s: dict) -> str:
    return f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})"


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "CPU-sized model, fp32, aot_eager, few repeats (a "
                                            "smoke test, not a result)")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager with --quick)")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY)
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    repeats, warmup, steps = (3, 1, 2) if args.quick else (15, 2, 4)
    load = os.getloadavg()
    start = time.perf_counter()
    rows = [row for case, (frame, batch) in (QUICK_CASES if args.quick else CASES).items()
            for amp in ((None,) if args.quick else (None, torch.bfloat16))
            for row in measure_case(case, frame, batch, backend, amp, repeats, warmup, steps)]
    table = [[r["case"], r["variant"], r["amp"], r["batch"], fmt(r["compiled_over_eager"]),
              f"{r['eager_step_s'] * 1e3:.0f}", f"{r['compile_seconds']:.0f}",
              r.get("recompiled_after_prune_step", "-")] for r in rows]
    md = md_table(["model", "step", "precision", "batch", "compiled / eager step time (p25-p75)",
                   "eager ms per step", "compile s", "graphs recompiled by a prune step"],
                  table)
    md += (f"\n\nBackend {backend}. Median of {repeats} interleaved repeats (p25-p75) of "
           f"engine.train_one_epoch over {steps} batches after {warmup} warm-up; < 1: the "
           f"compiled step is faster. Pruning step: a quarter of every kind of unit removed, "
           f"saliency collected. Compile s: first call compiled minus first call eager.")
    common.publish(name, md, load, args.quick, backend=backend,
                   seconds=time.perf_counter() - start, rows=rows)


if __name__ == "__main__":
    main()
