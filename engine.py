"""The training and evaluation loops shared by revit_scratch.py and nvit_prune.py."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from timm.utils import accuracy

import utils
from errors import UserError
from losses import mean_of_heads


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # --amp-dtype


def amp_dtype_for(device: torch.device, amp: bool, name: str | None = None
                  ) -> torch.dtype | None:
    """--amp means fp16 autocast (with a grad scaler) on CUDA and bf16 autocast on the CPU, as
    the reference; --amp-dtype NAME (which implies --amp) chooses: bf16 needs no scaler and
    does not overflow where fp16 can (DeiT-B)."""
    if name is not None:
        return AMP_DTYPES[name]
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None):
    """Only fp16 needs loss scaling; bf16 has fp32's range."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def train_one_epoch(model: torch.nn.Module, criterion: Callable, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    grad_scaler=None, amp_dtype: torch.dtype | None = None,
                    clip_grad: float | None = None, clip_mode: str = "norm", model_ema=None,
                    mixup_fn=None, print_freq: int = 50, header: str | None = None,
                    after_backward: Callable[[float], None] | None = None,
                    after_step: Callable[[int, dict[str, float]], bool] | None = None,
                    start_iter: int = 0, seed_fn: Callable[[int], None] | None = None,
                    train_mode: bool = True,
                    step_update: Callable[[int], None] | None = None,
                    accum_steps: int = 1,
                    stop_requested: Callable[[], bool] | None = None,
                    means: utils.RunningMeans | None = None) -> dict[str, float]:
    """One pass over the loader; returns the epoch's mean loss (and its parts) and last lr.

    start_iter: iterations of this epoch already done (the loader then yields the rest).
    seed_fn(i) reseeds the RNGs before iteration i, so dropout and mixup replay exactly.
    after_backward(grad_scale) runs between backward and the optimizer step (the pruning
    loop reads gate gradients there); after_step(i, losses) gets the loss and a criterion's
    `last_parts` as floats (read in one host sync) and may return True to end the epoch
    early. train_mode False trains the model in eval mode (no dropout, no drop-path), as the
    NViT reference prunes and finetunes. step_update(i) runs before step i's optimizer step
    (a per-iteration learning-rate schedule, as timm's `scheduler.step_update`).
    stop_requested() (Ctrl-C / SIGTERM on this process) rides on the step's loss all-reduce:
    when any process asks, every process ends the epoch after the same step (its after_step
    done), without waiting for a prune step or the epoch's end. `means`: the epoch's running
    sums, when the caller keeps them (a run saved in mid-epoch resumes them).

    accum_steps N (--grad-accum-steps): an iteration is one optimizer step over N loader
    batches, each backward on loss / N, so it computes what one batch N times larger would
    (DDP syncs gradients on the last only); the hooks, the logged losses (means over the N)
    and `start_iter` count optimizer steps, and the epoch's last len % N batches are left out,
    as drop_last would leave them out of the larger batch.
    """
    model.train(train_mode)
    accum = max(1, int(accum_steps))
    total = start_iter + len(data_loader) // accum
    batch_size = (getattr(data_loader, "batch_size", None) or 1) * accum
    log = utils.ProgressLogger(header or f"Epoch [{epoch}]", total, print_freq, batch_size,
                               first=start_iter, means=means)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(data_loader)
    for i in range(start_iter, total):
        optimizer.zero_grad(set_to_none=True)
        micro = []
        for k in range(accum):
            samples, targets = utils.next_on_every_rank(batches)
            if seed_fn is not None and k == 0:
                seed_fn(i)
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                samples, targets = mixup_fn(samples, targets)
            last = k == accum - 1
            with contextlib.nullcontext() if last else _no_sync(model):
                with autocast(device, amp_dtype):
                    outputs = model(samples)
                    loss = criterion(samples, outputs, targets)
                parts = getattr(criterion, "last_parts", {})
                micro.append(torch.stack([loss.detach().float(),
                                          *(v.detach().float() for v in parts.values())]))
                if accum > 1:
                    loss = loss / accum
                if grad_scaler is not None:
                    grad_scaler.scale(loss).backward()
                else:
                    loss.backward()
        means = micro[0] if accum == 1 else torch.stack(micro).mean(0)
        # the loss summed over processes is non-finite when any process's loss is, and the
        # stop requests summed are positive when any process asks: all stop together. Read
        # after the optimizer step, so that the host never waits for the GPU before the
        # step (a diverged step only changes weights that are then dropped).
        stop = float(stop_requested()) if stop_requested is not None else 0.0
        flags = torch.stack([means[0], means.new_full((), stop)])  # a fill: no host-device copy
        values = torch.cat([means, utils.sum_over_ranks(flags)])
        if after_backward is not None:
            after_backward(grad_scaler.get_scale() if grad_scaler is not None else 1.0)
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        if clip_grad:
            if clip_mode == "value":
                torch.nn.utils.clip_grad_value_(params, clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
        if step_update is not None:
            step_update(i)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        values = values.tolist()  # the step's one host sync
        losses = dict(zip(["loss", *parts], values[:-2]))
        loss_sum, stops = values[-2:]
        if not math.isfinite(loss_sum):
            where = "" if math.isfinite(losses["loss"]) else f" (here {losses['loss']})"
            raise UserError(f"loss is not finite at epoch {epoch}, iteration {i}{where}; "
                            f"training diverged (lower --lr, or set --clip-grad)")
        if model_ema is not None:
            model_ema.update(model)
        log.update(**losses, lr=optimizer.param_groups[0]["lr"])
        log.step(i)
        if after_step is not None and after_step(i, losses):
            break
        if stops > 0:
            break
    stats = log.averages()
    stats["epoch_time"] = log.elapsed()
    return stats


def _no_sync(model: torch.nn.Module):
    """DDP's no_sync (gradients stay local on an accumulation micro-step), else nothing."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@torch.no_grad()
def extract_features(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a whole loader: the model's pooled pre-logits features (timm's
    forward_head(..., pre_logits=True)) in eval mode, in fp32 on the CPU."""
    model.eval()
    feats, labels = [], []
    for images, target in data_loader:
        with autocast(device, amp_dtype):
            f = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(labels)


def headline(stats: dict) -> tuple[str, float]:
    """The number a run is judged by: top-1 where there are labels and a classifier; the
    pooled features' mean cosine similarity to the full model in a label-free run."""
    if "acc1" in stats:
        return "top-1", stats["acc1"]
    return "feature cosine", stats["cos"]


def score_fields(stats: dict, when: str) -> dict[str, float]:
    """A score as a checkpoint records it: {"top1_<when>": ...} or, label-free,
    {"feature_cos_<when>": ...}."""
    return {f"top1_{when}": stats["acc1"]} if "acc1" in stats else \
        {f"feature_cos_{when}": stats["cos"]}


def recorded_score(ckpt: dict, when: str) -> float | None:
    """The score `score_fields` wrote, whichever kind it is (None: none recorded)."""
    for key in (f"top1_{when}", f"feature_cos_{when}"):
        if ckpt.get(key) is not None:
            return ckpt[key]
    return None


def score_text(stats: dict) -> str:
    if "acc1" in stats:
        return f"top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%"
    return f"feature cosine {stats['cos']:.4f}  feature loss {stats['loss']:.4g}"


@torch.no_grad()
def evaluate_features(data_loader: Iterable, model: torch.nn.Module, criterion,
                      device: torch.device, amp_dtype: torch.dtype | None = None,
                      sharded: bool = False) -> dict[str, float]:
    """A label-free run's score over the whole loader: the mean cosine similarity of the
    student's pooled features to the full model's, and the mean of the feature loss
    (`criterion` a losses.FeatureDistillLoss; `model` returns its feature pair). Per-batch
    values are weighted by batch size; `sharded` as in `evaluate`."""
    model.eval()
    cos_sum = loss_sum = count = 0.0
    error = None
    batches = iter(data_loader)
    while True:
        try:
            images, _ = next(batches)
        except StopIteration:
            break
        except UserError as e:
            if not sharded:
                raise
            error = e
            break
        images = images.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            parts = criterion.parts(model(images), criterion.full_model(images))
        loss, cos = criterion.total(parts), parts["cos"]
        n = images.shape[0]
        cos_sum += cos.item() * n
        loss_sum += loss.item() * n
        count += n
    if sharded:
        cos_sum, loss_sum, count, failed = utils.all_reduce_sum(
            [cos_sum, loss_sum, count, float(error is not None)])
        utils.raise_on_every_rank(error, failed > 0)
    count = max(count, 1)
    return {"cos": cos_sum / count, "loss": loss_sum / count, "n": int(count)}


def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: torch.dtype | None = None, sharded: bool = False) -> dict[str, float]:
    """Top-1/top-5 and loss over the whole loader; `sharded` (--dist-eval) sums exact counts
    over the ranks' disjoint shards, otherwise every rank scores the whole set itself."""
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    error = None  # a bad image in this rank's shard: every rank stops at the sum below
    batches = iter(data_loader)
    while True:
        try:
            images, target = next(batches)
        except StopIteration:
            break
        except UserError as e:
            if not sharded:
                raise  # every rank reads the whole set and meets the same image
            error = e
            break
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = mean_of_heads(model(images))
        output = output.float()
        k = min(5, output.shape[1])
        acc1, acc5 = accuracy(output, target, topk=(1, k))
        n = images.shape[0]
        correct1 += acc1.item() * n / 100
        correct5 += acc5.item() * n / 100
        loss_sum += criterion(output, target).item()
        count += n
    if sharded:
        correct1, correct5, loss_sum, count, failed = utils.all_reduce_sum(
            [correct1, correct5, loss_sum, count, float(error is not None)])
        utils.raise_on_every_rank(error, failed > 0)
    count = max(count, 1)
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count,
            "loss": loss_sum / count, "n": int(count)}
