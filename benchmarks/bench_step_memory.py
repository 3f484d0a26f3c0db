"""Study 9: activation memory of a pruning step against a plain distillation step.

    python -m benchmarks.bench_step_memory [--quick] [--device cuda]

What one forward + loss + backward adds at its peak over the memory already held (weights,
their gradients, the frozen full model): on CUDA `torch.cuda.max_memory_allocated` minus
the allocation before the step; on the CPU the same quantity from a dispatch mode that
follows every storage the step creates until it is freed. The step is what
nvit_prune.py runs between prune steps: the shipped model, `builders.build_criterion` (KL to
the frozen full model + DeiT loss), and for the gated variants `Gates.attach` - fresh (all
gates 1, the first interval) and after pruning a quarter of the embedding channels, QK, V
and MLP units of every block (`Gates.remove`: the LayerNorm over live channels runs). Each
is measured at two batch sizes: the slope is the memory per image, the intercept what does
not grow with the batch (weight-sized copies such as the gated weights). Headline: the
per-image memory of each gated variant over the plain step's, in fp32, bf16 and fp16
autocast. Memory does not depend on timing, so the numbers are exact repeats.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python benchmarks/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks.passive  # noqa: F401  first: sets OMP_WAIT_POLICY before torch

import copy
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import builders
import engine
import models
from benchmarks import common
from benchmarks.bench_prune_overhead import SCALES, loss_args
from benchmarks.common import md_table
from models.dims import Dims
from pruning import KINDS, Gates, Saliency
from pruning.cost import MacsCost
from pruning.loop import PruningLoop
from pruning.pruner import GlobalPruner

STUDY = "step_memory"
CASES = {  # name -> (timm name, frame, batch sizes)
    "DeiT-B/224 distilled": ("deit_base_distilled_patch16_224", dict(num_classes=1000), (2, 4)),
    "DeiT-Ti/224 distilled": ("deit_tiny_distilled_patch16_224", dict(num_classes=1000), (4, 8)),
}
QUICK_CASES = {
    "cpu-sized (32 px, patch 4, E 64, depth 2)": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=4, num_classes=10, dims=Dims.uniform(64, 2, 2, 128)), (8, 16)),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRUNED_SHARE = 0.25


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive, and their peak.

    The CPU allocator keeps no statistics; this follows every new storage an op returns
    (outputs that alias an input are not new) until it is freed. PyTorch's MemTracker does
    the same but cannot run a model whose parameters are frozen (the full model of the KL).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, storage.nbytes())
        return out


def step_peak_bytes(step, device: torch.device) -> int:
    """Bytes `step()` allocates at its peak beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveBytes() as tracker:
        step()
    return tracker.peak


def prune_a_share(gates: Gates, share: float) -> None:
    """Remove the first `share` of the embedding channels and of every block's QK, V and MLP
    units (heads stay): the state of a run some prune steps in."""
    def first(n: int) -> list[int]:
        return list(range(int(n * share)))
    gates.remove("emb", 0, first(gates.embs[0].numel()))
    for i, block in enumerate(gates.blocks):
        for kind in ("qk", "v", "mlp"):
            gates.remove(kind, i, first(block[kind].shape[-1]))


def pruning_loop_hooks(model: models.ReViT, criterion, optimizer, steps: int):
    """Gates on `model` with PRUNED_SHARE of its units removed and the engine hooks
    nvit_prune.py's loop runs between prune steps (none falls due): a pruning-loop step to
    time against a plain one (bench_compile, bench_gpu). Returns (gates, hooks)."""
    gates = Gates.attach(model)
    prune_a_share(gates, PRUNED_SHARE)
    saliency = Saliency(gates, "hessian", SCALES, 0.9)
    pruner = GlobalPruner(gates, saliency, MacsCost(model.dims), 0.0, 32, {k: 1 for k in KINDS})
    loop = PruningLoop(model, gates, saliency, pruner, criterion, optimizer,
                       interval=10**9, iters_per_epoch=steps)
    return gates, loop.hooks(0)


def variants(dense: models.ReViT) -> dict[str, models.ReViT]:
    plain = copy.deepcopy(dense).train()
    fresh = copy.deepcopy(dense).train()
    Gates.attach(fresh)
    pruned = copy.deepcopy(dense).train()
    prune_a_share(Gates.attach(pruned), PRUNED_SHARE)
    return {"plain": plain, "gated": fresh, f"gated, {PRUNED_SHARE:.0%} pruned": pruned}


def measure_case(case: str, name: str, frame: dict, batches: tuple[int, int],
                 device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    dense = models.build_model(name, **frame).to(device)
    full = builders.frozen_copy(dense)  # the KL's full model, as nvit_prune.py makes it
    nb_classes = dense.dims.num_classes
    criterion = builders.build_criterion(loss_args(), nb_classes, None, device, kl_tau=3.0,
                                         per_head=False, full_model=full)
    criterion.kl_enabled = True  # the pruning phase
    size = dense.dims.img_size
    data = {b: (torch.randn(b, 3, size, size, device=device),
                torch.randint(0, nb_classes, (b,), device=device)) for b in batches}
    rows = []
    for precision, dtype in PRECISIONS.items():
        peaks = {}
        for variant, model in variants(dense).items():
            for b, (x, y) in data.items():
                def step():
                    with engine.autocast(device, dtype):
                        loss = criterion(x, model(x), y)
                    loss.backward()
                step()  # gradients allocated, as in every step after the first
                peaks[variant, b] = step_peak_bytes(step, device)
        lo, hi = batches
        per_image = {v: (peaks[v, hi] - peaks[v, lo]) / (hi - lo) for v, _ in peaks}
        for v in per_image:
            rows.append({"case": case, "precision": precision, "variant": v,
                         "batches": list(batches),
                         "peak_bytes": {str(b): peaks[v, b] for b in batches},
                         "mib_per_image": per_image[v] / 2**20,
                         "fixed_mib": (peaks[v, lo] - lo * per_image[v]) / 2**20,
                         "per_image_over_plain": per_image[v] / per_image["plain"],
                         "peak_over_plain": peaks[v, hi] / peaks["plain", hi]})
        print(f"  {case} {precision}: " + ", ".join(
            f"{v} {per_image[v] / 2**20:.1f} MiB/image" for v in per_image), file=sys.stderr)
    return rows


def main() -> None:
    p = common.study_parser(__doc__, STUDY, "a CPU-sized model only (a smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    name = common.apply_study_args(args, STUDY)
    load = os.getloadavg()
    device = torch.device(args.device)
    cases = QUICK_CASES if args.quick else CASES
    rows = [r for case, (model, frame, batches) in cases.items()
            for r in measure_case(case, model, frame, batches, device)]
    table = [[r["case"], r["precision"], r["variant"], f"{r['mib_per_image']:.1f}",
              f"{r['fixed_mib']:.1f}", f"{r['per_image_over_plain']:.3f}",
              f"{r['peak_over_plain']:.3f}"] for r in rows]
    md = md_table(["model", "precision", "step", "MiB per image", "MiB not growing with batch",
                   "per image / plain", "peak at the larger batch / plain"], table)
    how = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
           "a dispatch mode following every storage the step creates")
    md += (f"\n\nOn {device}: what one forward + loss (KL to the frozen full model + DeiT loss) + "
           f"backward allocates at its peak beyond the weights, their gradients and the full "
           f"model, measured with {how} at two batch sizes (slope = per image, intercept = "
           f"fixed). Gated: Gates.attach; pruned: {PRUNED_SHARE:.0%} of the embedding channels "
           f"and of every block's QK, V and MLP units removed.")
    common.publish(name, md, load, args.quick, device=str(device), rows=rows)


if __name__ == "__main__":
    main()
