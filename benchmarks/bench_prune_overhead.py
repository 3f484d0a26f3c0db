"""Study 3: what does pruning cost per training step? The NViT loop step against plain distillation.

    python -m benchmarks.bench_prune_overhead [--quick] [--threads N]

Three copies of one distilled model with the same weights, each with its own optimizer
(builders.build_optimizer: timm AdamW), the same batches and the same loss
(builders.build_criterion: kl_loss_coeff * KL(frozen full model || student) + DeiT loss;
distillation type "none", so the DeiT loss is label-smoothed CE on both heads and no CNN
teacher runs). Every variant runs the shipped `engine.train_one_epoch` over the same few
batches, timed interleaved, in fp32 and under bf16 autocast (--amp on the CPU):

- plain: distillation training steps without gates;
- pruning loop: the steps nvit_prune.py runs between prune steps - gates attached
  (Gates.attach) and a `pruning.loop.PruningLoop` driving the engine's hooks (after each
  backward: gates.all_reduce_grads, divide by the grad scale, one finiteness check,
  saliency.accumulate, gates.zero_grad);
- gates only: gates attached, no PruningLoop hooks (the split between gated forward/backward
  and saliency bookkeeping).

Headline: time ratio pruning-loop epoch / plain epoch (median of pairs, p25-p75); and the
bytes of activations saved for backward by one bf16 step, gated vs plain (saved-tensor
hooks: the memory a step holds at its peak beyond the weights and optimizer state).
Then one `GlobalPruner.step()` (hessian saliency from random accumulated scores, reference
group sizes, --prune_per_iter 32) with a MACs cost and with a latency table (a synthetic one
of tools/build_latency_table.py's default grid, values proportional to MACs: only the lookup
cost matters here; a fresh table each time, so its memo starts cold), timed between the same
plain steps and reported amortised over --interval_prune 100: t(pruner.step) / (100 t(plain)).
The Swin case (Swin-T's first two stages at 32 px) runs the same, with the MACs cost only.
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

import builders
import engine
import models
from benchmarks import common
from benchmarks.common import md_table, ratio_stats
from pruning import Gates, Saliency
from pruning.cost import LatencyTable, build_cost_model
from pruning.loop import PruningLoop
from pruning.pruner import GlobalPruner

STUDY = "prune_overhead"
NAME = "deit_tiny_distilled_patch16_224"
INTERVAL = 100
PRUNE_PER_ITER = 32
GROUP_SIZES = {"emb": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16}  # configs/nvit_reference.json
SCALES = {"emb": 12, "head": 12, "qk": 2, "v": 2, "mlp": 1}
SWIN = "swin_tiny_patch4_window7_224"
CASES = {  # case -> (timm name, frame and timm kwargs, batch)
    "cpu-sized (32 px, patch 4, depth 4, E 192)": (
        NAME, dict(img_size=32, patch_size=4, num_classes=10, depth=4), 64),
    "DeiT-Ti/224 distilled": (NAME, dict(num_classes=1000), 8),
    "Swin, cpu-sized (32 px, patch 2, windows 4, Swin-T's first two stages)": (
        SWIN, dict(img_size=32, patch_size=2, window_size=4, depths=(2, 2), embed_dim=96,
                   num_heads=(3, 6), num_classes=10), 64),
}


def loss_args() -> SimpleNamespace:
    """The flags builders.build_criterion/build_optimizer read, at nvit_prune.py's defaults."""
    return SimpleNamespace(
        bce_loss=False, smoothing=0.1, distillation_type="none", teacher_path="",
        teacher_model="regnety_160", distillation_alpha=0.5, distillation_tau=1.0,
        kl_loss_coeff=1.0, original_loss_coeff=1.0, base_loss_head="mean", kl_tau=3.0, pretrained_path="", pretrained=False,
        input_size=None, model=NAME, opt="adamw", opt_eps=1e-8, opt_betas=None, lr=1e-4,
        unscale_lr=True, batch_size=None, weight_decay=0.05, momentum=0.9)


def make_dense(name: str, frame: dict):
    frame = dict(frame)
    depth = frame.pop("depth", None)
    dims = None
    if depth is not None:
        base = models.name_dims(name)
        dims = models.Dims.uniform(base.embed_dim, depth, base.num_heads[0], base.mlp_dim[0])
    return models.build_model(name, dims=dims, **frame)


def synthetic_latency_table(num_tokens: int) -> dict:
    """tools/build_latency_table.py's default grid; values = MACs (the lookup cost is the point)."""
    Es, Hs, Qs, Vs, Ms = [192, 384, 768], [1, 2, 4, 8, 12], [8, 16, 32, 64], [8, 16, 32, 64], \
        [192, 768, 1536, 3072]
    N = num_tokens

    def att(E, H, q, v):
        return 1e-9 * (N * E * H * (2 * q + v) + N * H * v * E + N * N * H * (q + v))

    attention = [[[[att(E, H, q, v) for v in Vs] for q in Qs] for H in Hs] for E in Es]
    mlp = [[1e-9 * 2 * N * E * M for M in Ms] for E in Es]
    return LatencyTable.make_dict({"synthetic": True, "num_tokens": N},
                                  {"embed_dim": Es, "num_heads": Hs, "qk_dim": Qs, "v_dim": Vs},
                                  attention, {"embed_dim": Es, "mlp_dim": Ms}, mlp)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_case(case: str, name: str, frame: dict, batch: int, repeats: int, warmup: int,
                 steps: int, amp_dtype) -> dict:
    torch.manual_seed(0)
    dense = make_dense(name, frame)
    swin = isinstance(dense.dims, models.SwinDims)
    full = builders.frozen_copy(dense)  # the KL's full model, as nvit_prune.py makes it
    args = loss_args()
    nb_classes = dense.dims.num_classes
    cpu = torch.device("cpu")
    criterion = builders.build_criterion(args, nb_classes, None, cpu,
                                         kl_tau=args.kl_tau, per_head=False, full_model=full)
    criterion.kl_enabled = True  # the pruning phase: KL on, as from the first prune step
    size = dense.dims.img_size
    batches = [(torch.randn(batch, 3, size, size), torch.randint(0, nb_classes, (batch,)))
               for _ in range(steps)]

    plain = copy.deepcopy(dense).train()
    pruned = copy.deepcopy(dense).train()
    gated = copy.deepcopy(dense).train()
    gates = Gates.attach(pruned)
    saliency = Saliency(gates, "hessian", SCALES, 0.9)
    opts = {name: builders.build_optimizer(args, m)
            for name, m in (("plain", plain), ("pruning loop", pruned), ("gates only", gated))}
    pruner = GlobalPruner(gates, saliency, build_cost_model("macs", dense.dims), 0.0,
                          PRUNE_PER_ITER, GROUP_SIZES)
    loop = PruningLoop(pruned, gates, saliency, pruner, criterion, opts["pruning loop"],
                       interval=10**9, iters_per_epoch=steps)  # no prune step while timed
    only_gates = Gates.attach(gated)

    def epoch(model, name, **hooks):
        def run():
            with contextlib.redirect_stdout(io.StringIO()):  # the engine's end-of-epoch line
                engine.train_one_epoch(model, criterion, batches, opts[name], cpu, 0,
                                       amp_dtype=amp_dtype, print_freq=10**9, **hooks)
        return run
    runs = {"plain": epoch(plain, "plain"),
            "pruning loop": epoch(pruned, "pruning loop", **loop.hooks(0)),
            "gates only": epoch(gated, "gates only", after_backward=lambda s: gated_zero(only_gates))}

    def step_bytes(model) -> int:
        x, y = batches[0]

        def fwd():
            with engine.autocast(cpu, amp_dtype):
                criterion(x, model(x), y)
        return saved_bytes(fwd)

    # the prune step itself, on its own gated copy so the loop above is not disturbed
    victim = copy.deepcopy(dense).train()
    victim_gates = Gates.attach(victim)
    table = None if swin else synthetic_latency_table(dense.dims.num_tokens)
    gen = torch.Generator().manual_seed(1)

    def fresh_pruner(kind: str) -> GlobalPruner:
        with torch.no_grad():
            for t in victim_gates.tensors():
                t.fill_(1.0)
        sal = Saliency(victim_gates, "hessian", SCALES, 0.9)
        sal.sums = [torch.rand(s.shape, generator=gen, dtype=torch.float64) for s in sal.sums]
        sal.count = INTERVAL
        cost = (build_cost_model("macs", dense.dims) if kind == "macs"
                else LatencyTable.from_dict(table))
        p = GlobalPruner(victim_gates, sal, cost, 0.5, PRUNE_PER_ITER, GROUP_SIZES,
                         latency_lambda=5e-4 if kind == "latency" else 0.0)
        p.steps = 1  # past the first step: a steady-state one, prune_per_iter // 16 groups
        return p

    prune_kinds = ("macs",) if swin else ("macs", "latency")  # no synthetic Swin table
    times = {k: [] for k in (*runs, *(f"pruner.step {k}" for k in prune_kinds))}
    removed = {}
    for r in range(warmup + repeats):
        for name, fn in runs.items():
            t = timed(fn)
            if r >= warmup:
                times[name].append(t)
        for kind in prune_kinds:
            p = fresh_pruner(kind)
            t = timed(lambda: removed.__setitem__(kind, p.step(victim).removed))
            if r >= warmup:
                times[f"pruner.step {kind}"].append(t)
    plain_step = [t / steps for t in times["plain"]]
    result = {
        "case": case, "batch": batch, "steps_per_epoch": steps, "dims": dense.dims.to_dict(),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "loop_over_plain": ratio_stats(times["pruning loop"], times["plain"]),
        "gates_only_over_plain": ratio_stats(times["gates only"], times["plain"]),
        "saved_bytes_plain": step_bytes(plain), "saved_bytes_gated": step_bytes(pruned),
        "times": times,
    }
    result["saved_bytes_ratio"] = result["saved_bytes_gated"] / result["saved_bytes_plain"]
    for kind in prune_kinds:
        result[f"pruner_step_{kind}_amortised"] = ratio_stats(
            times[f"pruner.step {kind}"], [INTERVAL * t for t in plain_step])
        result[f"pruner_step_{kind}_over_plain"] = ratio_stats(times[f"pruner.step {kind}"], plain_step)
        result[f"pruner_step_{kind}_removed"] = removed[kind]
    return result


def gated_zero(gates: Gates) -> None:
    """Gates only: drop the gate gradients as the loop would, without scoring them."""
    for g in gates.tensors():
        g.grad = None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fmt(s: dict, pct: bool = False) -> str:
    if pct:
        return f"{100 * s['median']:.2f}% ({100 * s['p25']:.2f}-{100 * s['p75']:.2f})"
    return f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})"


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "few repeats (a smoke test, not a result)")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY)
    # --quick is a smoke test: CPUs without native bf16 (AVX2 only) take seconds per bf16 step
    repeats, warmup = (2, 0) if args.quick else (20, 3)
    load = os.getloadavg()
    steps = 1 if args.quick else 4
    rows = [measure_case(case, name, frame, batch // 8 if args.quick else batch, repeats, warmup,
                         steps, amp)
            for case, (name, frame, batch) in CASES.items() for amp in (None, torch.bfloat16)]
    table = [[r["case"], r["amp"], r["batch"], fmt(r["loop_over_plain"]),
              fmt(r["gates_only_over_plain"]), f"{r['saved_bytes_ratio']:.3f}",
              fmt(r["pruner_step_macs_amortised"], pct=True),
              fmt(r["pruner_step_latency_amortised"], pct=True)
              if "pruner_step_latency_amortised" in r else "-"] for r in rows]
    md = md_table(["model", "precision", "batch", "pruning-loop step / plain step (p25-p75)",
                   "gates only / plain", "activation bytes saved for backward, gated / plain",
                   "pruner.step MACs cost, amortised / plain step",
                   "pruner.step latency table, amortised / plain step"], table)
    md += (f"\n\nMedian of {repeats} interleaved repeats (p25-p75) of engine.train_one_epoch over "
           f"{steps} batches. Plain step = distillation "
           f"training step (KL to the frozen full model + DeiT loss, AdamW). Amortised = "
           f"t(pruner.step) / ({INTERVAL} x t(plain step)), i.e. the share one prune step "
           f"every --interval_prune {INTERVAL} iterations adds; --prune_per_iter {PRUNE_PER_ITER}.")
    common.publish(name, md, load, args.quick, interval_prune=INTERVAL,
                   prune_per_iter=PRUNE_PER_ITER, rows=rows)


if __name__ == "__main__":
    main()
