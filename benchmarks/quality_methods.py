"""Study 5: the pruning methods - the shipped pruning loop under each criterion and cost, and
Torch-Pruning's ViT recipe (h)."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import warnings

import torch

import engine
import models
from benchmarks.quality_config import BUDGETS, Config
from benchmarks.quality_training import CPU, DistilBatches, make_optimizer, pruning_loss
from pruning import Gates, Saliency, compact
from pruning.cost import LatencyTable, MacsCost, build_cost_model
from pruning.loop import PruningLoop
from pruning.pruner import GlobalPruner


# ------------------------------------------------------------------------- pruning
def prune_ours(dense: models.ReViT, criterion: str, cost_kind: str, batches: DistilBatches,
               cfg: Config, seed: int, table: LatencyTable | None,
               scales: dict | None = None) -> dict:
    """NViT's shipped loop (pruning.loop.PruningLoop over engine.train_one_epoch, the loss,
    pace, student_eval and constant learning rate of the reference) from dense weights
    through every budget; returns compact snapshots. (b) ranks by the latency table, lambda
    calibrated at the first prune step (GlobalPruner.calibrate_lambda), and stops at the
    MACs budget like every other method."""
    torch.manual_seed(seed)
    model = copy.deepcopy(dense).train()
    gates = Gates.attach(model)
    saliency = Saliency(gates, criterion, scales, 0.9, seed)  # None: reference scales
    targets = sorted(BUDGETS, reverse=True)
    pruner = GlobalPruner(gates, saliency, build_cost_model("macs", model.dims), targets[0], cfg.prune_per_iter,
                          cfg.group_sizes, rank_cost=table if cost_kind == "latency" else None)
    opt = make_optimizer(model, cfg.prune_lr, cfg.weight_decay)
    out, t0 = {}, time.perf_counter()
    loop = None

    def on_prune(record: dict) -> None:
        for target in record.get("targets_reached", []):
            snap = compact(model).eval()
            Gates.detach_from(snap)
            out[target] = {"model": snap,
                           "iterations": record["epoch"] * per_epoch + record["iteration"],
                           "steps": pruner.steps, "lambda": pruner.latency_lambda,
                           "stuck": loop.stuck, "seconds": time.perf_counter() - t0}
            print(f"  {criterion}+{cost_kind}: {target:.2f} reached after {pruner.steps} "
                  f"steps, MACs ratio {record['ratio']:.3f}"
                  f"{' (STUCK at minimum widths)' if loop.stuck else ''} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    per_epoch = batches.per_epoch()
    loop = PruningLoop(model, gates, saliency, pruner, pruning_loss(cfg, model.dims.num_classes),
                       opt, interval=cfg.interval, iters_per_epoch=per_epoch,
                       student_eval=cfg.student_eval, on_prune=on_prune,
                       later_targets=targets[1:],
                       lambda_weight=cfg.latency_weight if cost_kind == "latency" else None)
    max_epochs = math.ceil(200 * cfg.interval / per_epoch)  # 200 prune steps at most
    for epoch in range(max_epochs):
        if loop.done:
            break
        loop.set_phase()  # as nvit_prune.py, before every epoch
        batch_list = [batches.next() for _ in range(per_epoch)]
        with contextlib.redirect_stdout(io.StringIO()):
            engine.train_one_epoch(model, loop.criterion, batch_list, opt, CPU, epoch,
                                   print_freq=10**9, **loop.hooks(epoch))
    return out


# ------------------------------------------------------------------ Torch-Pruning
def _sync_timm_heads(vit, pruner) -> None:
    """After a Torch-Pruning step the attention modules must learn their new head count."""
    from timm.models.vision_transformer import Attention
    for m in vit.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim


def _skip_headless_steps(pruner) -> None:
    """Work around a Torch-Pruning 1.6.0 bug in global head pruning.

    When a step's scheduled head ratio removes no further head, `_prune` reads an unset
    `head_thres` (UnboundLocalError). Such steps get head ratio 0 instead (no head scope at
    all, which TP handles); the steps that do remove heads keep their scheduled ratio, so the
    head schedule is unchanged.
    """
    total = pruner.initial_total_heads
    ratios = list(pruner.per_step_head_pruning_ratio)
    removed = 0
    for k in range(1, len(ratios)):
        wanted = total - int(total * (1 - ratios[k]))
        if wanted > removed:
            removed = wanted
        else:
            ratios[k] = 0.0
    pruner.per_step_head_pruning_ratio = ratios


def _tp_train_interval(model, loss, batches: DistilBatches, cfg: Config, step: int) -> None:
    """Between two Torch-Pruning steps: cfg.interval training iterations with the shared
    loss (KL on from the second step), leaving in each parameter's .grad the gradient
    averaged over them, which GroupTaylorImportance reads."""
    opt = make_optimizer(model, cfg.prune_lr, cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]

    def accumulate(grad_scale: float) -> None:
        for a, p in zip(acc, params):
            if p.grad is not None:
                a += p.grad
    loss.kl_enabled = step > 0
    with contextlib.redirect_stdout(io.StringIO()):
        engine.train_one_epoch(model, loss, [batches.next() for _ in range(cfg.interval)],
                               opt, CPU, step, print_freq=10**9, after_backward=accumulate)
    for a, p in zip(acc, params):
        p.grad = a / cfg.interval


def _take_reached(out: dict, targets: list[float], ratio: float, snapshot, it: int,
                  step: int, t0: float) -> None:
    """For every budget (largest first) the MACs ratio is now at or below, a model of its
    own from `snapshot()` (each budget's is finetuned apart); those budgets leave `targets`."""
    while targets and ratio <= targets[0]:
        out[targets[0]] = {"model": snapshot(), "iterations": it, "steps": step + 1,
                           "seconds": time.perf_counter() - t0}
        print(f"  torch-pruning: {targets[0]:.2f} reached after {step + 1} steps / {it} "
              f"iterations, MACs ratio {ratio:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        targets.pop(0)


def prune_torch_pruning(dense: models.ReViT, batches: DistilBatches, cfg: Config,
                        seed: int) -> dict:
    """Torch-Pruning's documented ViT recipe, iterative, with the same loss between steps as
    ours (the label loss, then the KL term too from the first step on, student in train mode).

    MetaPruner + GroupTaylorImportance, global_pruning with isomorphic scopes, whole heads
    removed (prune_num_heads, head_pruning_ratio) and the embedding, MLP hidden widths;
    the classifier is ignored. Taylor scores use the gradient averaged over the batches
    since the last step. Steps continue until the MACs ratio of the converted model is at or
    below each budget; the optimizer is rebuilt after each step (parameters are replaced).
    """
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    from models.timm_vit import (
        load_nvit,
        nvit_to_timm_vit,
        timm_vit_dims,
        timm_vit_to_nvit,
    )

    torch.manual_seed(seed)
    vit = nvit_to_timm_vit(dense).train()
    loss = pruning_loss(cfg, dense.dims.num_classes)
    macs = MacsCost(dense.dims)
    dense_cost = macs.total(dense.dims)
    num_heads = {m.qkv: m.num_heads for m in vit.modules() if isinstance(m, Attention)}
    example = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            vit, example, importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
            isomorphic=True, pruning_ratio=cfg.tp_ratio, iterative_steps=cfg.tp_steps,
            ignored_layers=[vit.head], num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=cfg.tp_head_ratio, round_to=2)
    _skip_headless_steps(pruner)
    targets = sorted(BUDGETS, reverse=True)
    out, it, t0 = {}, 0, time.perf_counter()
    for step in range(cfg.tp_steps):
        _tp_train_interval(vit, loss, batches, cfg, step)
        it += cfg.interval
        pruner.step()
        _sync_timm_heads(vit, pruner)
        vit.zero_grad(set_to_none=True)
        ratio = macs.total(timm_vit_dims(vit)) / dense_cost
        _take_reached(out, targets, ratio,
                      lambda: load_nvit(*timm_vit_to_nvit(vit.eval())).eval(), it, step, t0)
        vit.train()
        if not targets:
            break
    if targets:
        print(f"  torch-pruning: budgets {targets} not reached in {cfg.tp_steps} steps")
    return out


def swin_to_timm(model):
    """timm's SwinTransformer with the weights of a ReSwin whose stages are uniform."""
    import timm
    d = model.dims
    if not d.is_uniform or d.qk_dim != d.v_dim or d.version != 1:
        raise ValueError("timm's SwinTransformer needs uniform stages with QK width = V width")
    firsts = [d.stage_blocks(s).start for s in range(d.num_stages)]
    theirs = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=d.img_size,
        patch_size=d.patch_size, embed_dim=d.embed_dim[0], depths=tuple(d.depths),
        num_heads=tuple(d.num_heads[i] for i in firsts), window_size=d.window_size[0],
        mlp_ratio=d.mlp_dim[0] / d.embed_dim[0], num_classes=d.num_classes)
    if [s.blocks[0].norm1.normalized_shape[0] for s in theirs.layers] != d.embed_dim:
        raise ValueError("timm's SwinTransformer doubles the width per stage; this one does not")
    theirs.load_state_dict(model.state_dict(), strict=False)
    return theirs


def prune_torch_pruning_swin(dense, batches: DistilBatches, cfg: Config, seed: int) -> dict:
    """Torch-Pruning on timm's SwinTransformer where it can prune it: the MLP hidden units
    (MetaPruner + GroupTaylor, global, every other layer ignored), with the same loss
    between steps as ours. Its other scopes break a Swin (Torch-Pruning 1.6.1, measured on
    the study's model): with prune_num_heads the attentions' head counts and qkv rows
    disagree; with the embedding, each patch merging's 4C input is pruned as channels of its
    own (126 of 128 where the previous stage kept 30 of 32, so 120), and the model no longer
    runs. Each step's model is read back as our ReSwin, whose logits must equal timm's."""
    import torch_pruning as tp

    from models.timm_swin import timm_swin_dims

    torch.manual_seed(seed)
    swin = swin_to_timm(dense).train()
    loss = pruning_loss(cfg, dense.dims.num_classes)
    macs = build_cost_model("macs", dense.dims)
    dense_cost = macs.total(dense.dims)
    fc1 = {m for n, m in swin.named_modules() if n.endswith("mlp.fc1")}
    ignored = [m for m in swin.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m not in fc1]
    example = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            swin, example, importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
            pruning_ratio=cfg.tp_ratio, iterative_steps=cfg.tp_steps, ignored_layers=ignored,
            round_to=2)
    targets = sorted(BUDGETS, reverse=True)
    out, it, t0 = {}, 0, time.perf_counter()
    check = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    for step in range(cfg.tp_steps):
        _tp_train_interval(swin, loss, batches, cfg, step)
        it += cfg.interval
        pruner.step()
        swin.zero_grad(set_to_none=True)
        dims = timm_swin_dims(swin)
        ours = models.ReSwin(dims)
        ours.load_state_dict(swin.state_dict(), strict=True)
        with torch.no_grad():
            diff = float((ours.eval()(check) - swin.eval()(check)).abs().max())
        swin.train()
        if not diff < 1e-4:
            raise RuntimeError(f"after step {step + 1} Torch-Pruning's Swin and its reading "
                               f"differ by {diff:.3g}: TP left it inconsistent")
        ratio = macs.total(dims) / dense_cost
        _take_reached(out, targets, ratio, lambda: copy.deepcopy(ours).eval(), it, step, t0)
        if not targets:
            break
    if targets:
        print(f"  torch-pruning: budgets {targets} not reached in {cfg.tp_steps} steps (MACs "
              f"ratio {ratio:.3f} at the end)")
    return out
