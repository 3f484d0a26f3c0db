"""Study 3: what does pruning cost per training step? The NViT loop step against plain distillation.

    python benchmarks/bench_prune_overhead.py [--quick] [--threads N]

Three copies of one distilled model with the same weights, each with its own optimizer
(builders.build_optimizer: timm AdamW), the same batch and the same loss
(builders.build_criterion: kl_loss_coeff * KL(student || frozen full model) + DeiT loss;
distillation type "none", so the DeiT loss is label-smoothed CE on both heads and no CNN
teacher runs), timed interleaved:

- plain: one distillation training step without gates (forward, loss, backward, AdamW);
- pruning loop: the step nvit_prune.py runs between prune steps - gates attached
  (Gates.attach), forward/backward, then its after_backward (gates.all_reduce_grads, divide by
  the grad scale, one finiteness check, saliency.accumulate, gates.zero_grad), AdamW;
- gates only: the same with gates attached but no after_backward bookkeeping, to split the
  overhead into gated forward/backward and saliency bookkeeping.

Headline: time ratio pruning-loop step / plain step (median of pairs, p25-p75).
Then one `GlobalPruner.step()` (hessian saliency from random accumulated scores, reference
group sizes, --prune_per_iter 32) with a MACs cost and with a latency table (a synthetic one
of tools/build_latency_table.py's default grid, values proportional to MACs: only the lookup
cost matters here; a fresh table each time, so its memo starts cold), timed between the same
plain steps and reported amortised over --interval_prune 100: t(pruner.step) / (100 t(plain)).
"""
from __future__ import annotations

import os

from passive import machine_note, omp_policy  # before torch: sets OMP_WAIT_POLICY

import copy
import math
import time
from types import SimpleNamespace

import torch

import common
from common import md_table, ratio_stats, write_results

import builders
import models
from pruning import Gates, Saliency
from pruning.cost import LatencyTable, MacsCost
from pruning.pruner import GlobalPruner

STUDY = "prune_overhead"
NAME = "deit_tiny_distilled_patch16_224"
INTERVAL = 100
PRUNE_PER_ITER = 32
GROUP_SIZES = {"emb": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16}  # configs/nvit_reference.json
SCALES = {"emb": 12, "head": 12, "qk": 2, "v": 2, "mlp": 1}
CASES = {  # name -> (frame, batch)
    "cpu-sized (32 px, patch 4, depth 4, E 192)": (
        dict(img_size=32, patch_size=4, num_classes=10, depth=4), 64),
    "DeiT-Ti/224 distilled": (dict(num_classes=1000), 8),
}


def loss_args() -> SimpleNamespace:
    """The flags builders.build_criterion/build_optimizer read, at nvit_prune.py's defaults."""
    return SimpleNamespace(
        bce_loss=False, smoothing=0.1, distillation_type="none", teacher_path="",
        teacher_model="regnety_160", distillation_alpha=0.5, distillation_tau=1.0,
        kl_loss_coeff=1.0, original_loss_coeff=1.0, base_loss_head="mean", kl_tau=3.0, pretrained_path="", pretrained=False,
        input_size=None, model=NAME, opt="adamw", opt_eps=1e-8, opt_betas=None, lr=1e-4,
        unscale_lr=True, batch_size=None, weight_decay=0.05, momentum=0.9)


def make_dense(frame: dict) -> models.ReViT:
    frame = dict(frame)
    depth = frame.pop("depth", None)
    base = models.name_dims(NAME)
    dims = None
    if depth is not None:
        dims = models.Dims.uniform(base.embed_dim, depth, base.num_heads[0], base.mlp_dim[0])
    return models.build_model(NAME, dims=dims, **frame)


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


def train_step(model, criterion, optimizer, x, y, hook=None):
    """engine.train_one_epoch's inner loop body for one batch (fp32, no clipping, no mixup)."""
    def step() -> None:
        outputs = model(x)
        loss = criterion(x, outputs, y)
        if not math.isfinite(loss.item()):
            raise RuntimeError("loss is not finite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hook is not None:
            hook()
        optimizer.step()
    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_case(case: str, frame: dict, batch: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    dense = make_dense(frame)
    full = copy.deepcopy(dense).eval()
    for p in full.parameters():
        p.requires_grad_(False)
    args = loss_args()
    nb_classes = dense.dims.num_classes
    criterion = builders.build_criterion(args, nb_classes, None, torch.device("cpu"),
                                         kl_tau=args.kl_tau, per_head=False, full_model=full)
    x = torch.randn(batch, 3, dense.dims.img_size, dense.dims.img_size)
    y = torch.randint(0, nb_classes, (batch,))

    plain = copy.deepcopy(dense).train()
    pruned = copy.deepcopy(dense).train()
    gated = copy.deepcopy(dense).train()
    gates = Gates.attach(pruned)
    saliency = Saliency(gates, "hessian", SCALES, 0.9)
    gates_only = Gates.attach(gated)
    steps = {
        "plain": train_step(plain, criterion, builders.build_optimizer(args, plain), x, y),
        "pruning loop": train_step(pruned, criterion, builders.build_optimizer(args, pruned), x, y,
                                   hook=saliency.collect),
        "gates only": train_step(gated, criterion, builders.build_optimizer(args, gated), x, y,
                                 hook=gates_only.zero_grad),
    }

    # the prune step itself, on its own gated copy so the loop above is not disturbed
    victim = copy.deepcopy(dense).train()
    victim_gates = Gates.attach(victim)
    table = synthetic_latency_table(dense.dims.num_tokens)
    gen = torch.Generator().manual_seed(1)

    def fresh_pruner(kind: str) -> GlobalPruner:
        with torch.no_grad():
            for t in victim_gates.tensors():
                t.fill_(1.0)
        sal = Saliency(victim_gates, "hessian", SCALES, 0.9)
        sal.sums = [torch.rand(s.shape, generator=gen, dtype=torch.float64) for s in sal.sums]
        sal.count = INTERVAL
        cost = MacsCost(dense.dims) if kind == "macs" else LatencyTable.from_dict(table)
        pruner = GlobalPruner(victim_gates, sal, cost, 0.5, PRUNE_PER_ITER, GROUP_SIZES,
                              latency_lambda=5e-4 if kind == "latency" else 0.0)
        pruner.steps = 1  # past the first step: a steady-state one, prune_per_iter // 16 groups
        return pruner

    prune_kinds = ("macs", "latency")
    times = {k: [] for k in (*steps, *(f"pruner.step {k}" for k in prune_kinds))}
    removed = {}
    for r in range(warmup + repeats):
        for name, fn in steps.items():
            t = timed(fn)
            if r >= warmup:
                times[name].append(t)
        for kind in prune_kinds:
            pruner = fresh_pruner(kind)
            t = timed(lambda: removed.__setitem__(kind, pruner.step(victim).removed))
            if r >= warmup:
                times[f"pruner.step {kind}"].append(t)
    plain_t = times["plain"]
    result = {
        "case": case, "batch": batch, "dims": dense.dims.to_dict(),
        "loop_over_plain": ratio_stats(times["pruning loop"], plain_t),
        "gates_only_over_plain": ratio_stats(times["gates only"], plain_t),
        "times": times,
    }
    for kind in prune_kinds:
        result[f"pruner_step_{kind}_amortised"] = ratio_stats(
            times[f"pruner.step {kind}"], [INTERVAL * t for t in plain_t])
        result[f"pruner_step_{kind}_over_plain"] = ratio_stats(times[f"pruner.step {kind}"], plain_t)
        result[f"pruner_step_{kind}_removed"] = removed[kind]
    return result


def fmt(s: dict, pct: bool = False) -> str:
    if pct:
        return f"{100 * s['median']:.2f}% ({100 * s['p25']:.2f}-{100 * s['p75']:.2f})"
    return f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})"


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "few repeats (a smoke test, not a result)")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY)
    repeats, warmup = (3, 1) if args.quick else (20, 3)
    load = os.getloadavg()
    rows = [measure_case(case, frame, batch // 4 if args.quick else batch, repeats, warmup)
            for case, (frame, batch) in CASES.items()]
    table = [[r["case"], r["batch"], fmt(r["loop_over_plain"]), fmt(r["gates_only_over_plain"]),
              fmt(r["pruner_step_macs_amortised"], pct=True),
              fmt(r["pruner_step_latency_amortised"], pct=True)] for r in rows]
    md = md_table(["model", "batch", "pruning-loop step / plain step (p25-p75)",
                   "gates only / plain", "pruner.step MACs cost, amortised / plain step",
                   "pruner.step latency table, amortised / plain step"], table)
    md += (f"\n\nMedian of {repeats} interleaved repeats (p25-p75). Plain step = distillation "
           f"training step (KL to the frozen full model + DeiT loss, AdamW). Amortised = "
           f"t(pruner.step) / ({INTERVAL} x t(plain step)), i.e. the share one prune step "
           f"every --interval_prune {INTERVAL} iterations adds; --prune_per_iter {PRUNE_PER_ITER}.")
    md += "\n\n" + machine_note(load)
    path = write_results(name, {"omp_wait_policy": omp_policy(),
                                "quick": args.quick, "loadavg": [load, os.getloadavg()],
                                "interval_prune": INTERVAL,
                                "prune_per_iter": PRUNE_PER_ITER, "rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
