"""Prune a pretrained DeiT toward a latency (or MACs/params) target and write a compact model.

    python nvit_prune.py --model deit_base_distilled_patch16_224 --pretrained --pruning \
        --pruning_config configs/nvit_reference.json --latency_look_up_table TABLE.json \
        --latency_target 0.54 --data-path DIR --output_dir OUT ...
    torchrun --nproc_per_node=8 nvit_prune.py ...            (same flags, one process per GPU)

The flags mean what they meant in the NViT reference's main_full_global_latency.py. The
weights train on original_loss_coeff * DeiT loss, plus, from the first prune step on,
kl_loss_coeff * KL(frozen full model || student) at --kl-tau; with --student_eval the
student trains in eval mode from that step, and the saliency EMA restarts there. The
learning rate stays at its first value. Every --interval_prune iterations (optimizer
steps, of --grad-accum-steps batches each) a prune step removes --prune_per_iter //
--group_size more groups of any kind; the run ends when the
cost reaches --latency_target (0: no target), the --prune_dict budget is spent, or nothing
is left to remove. With several targets (--latency_target 0.54,0.39,0.19) it goes on
after each and writes pruned_<target>.pth, scored when reached, and pareto.png; the run ends
at the last. Outputs in --output_dir: pruned_checkpoint.pth (the compact model at the end,
loadable by revit_scratch.py --finetune/--eval), pruning_state.pth (for --resume; written
on the --save-every cadence, at each epoch's end, at the end and on Ctrl-C / SIGTERM),
log.txt (a JSON line per prune step and per epoch, and the final speed report: dense
against compact, timed here), TensorBoard scalars in tb/, args.yaml, dims_history.json and
widths.png.
"""
from __future__ import annotations

import functools
import json
import signal
from pathlib import Path

import torch

import builders
import checkpoints
import flags
import models
import pruning
import utils
from engine import (amp_dtype_for, evaluate, evaluate_features, make_grad_scaler, score_text,
                    train_one_epoch)
from errors import UserError
from models.checkpoint import has_split_qkv
from prune_recorder import PruneRecorder

QKV_UNIT_FLAGS = {"shared": "shared", "per-head": "per_head"}
assert set(QKV_UNIT_FLAGS.values()) == set(pruning.QKV_UNITS)


def get_args_parser() -> flags.Parser:
    p = flags.Parser("NViT global structural pruning of a pretrained DeiT", config=True)
    flags.add_run_args(p)
    flags.add_model_args(p, widths=False)
    flags.add_optimizer_args(p)
    flags.add_data_args(p)
    flags.add_loss_args(p, kl_loss_coeff=1000.0, student_eval_help=(
        "from the first prune step on, train the student in eval mode (no dropout or "
        "drop-path), as the reference can; default false"))
    p.set_defaults(student_eval=False)
    flags.add_checkpoint_args(p, finetune=False, resume_help=(
        "pruning state (file or URL) to continue; bare --resume: OUTPUT_DIR/pruning_state.pth"))
    flags.add_pruning_args(p, pace=pruning.DEFAULT_PACE, emb_saliency=pruning.EMB_SALIENCY,
                           qkv_units=tuple(QKV_UNIT_FLAGS))
    return p


# ------------------------------------------------------------------------------ inputs
def read_json_file(path: str, flag: str):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{flag} {path} is not valid JSON: {e}") from None


def pruning_config(args) -> pruning.PruningConfig:
    if not args.pruning_config:
        return pruning.PruningConfig()
    data = read_json_file(args.pruning_config, "--pruning_config")
    try:
        return pruning.parse_config(data)
    except ValueError as e:
        raise UserError(f"--pruning_config {args.pruning_config}: {e}") from None


def prune_budget(args) -> int | None:
    try:
        data = json.loads(args.prune_dict)
    except ValueError as e:
        raise UserError(f"--prune_dict is not valid JSON: {e}") from None
    if not isinstance(data, dict) or set(data) - {"Global"} or \
            not isinstance(data.get("Global", 0), int) or data.get("Global", 1) <= 0:
        raise UserError('--prune_dict must look like {"Global": N} with N > 0')
    return data.get("Global")


def check_args(args) -> None:
    if not args.pruning:
        raise UserError("nothing to do without --pruning (to train without pruning use revit_scratch.py)")
    if not args.output_dir:
        raise UserError("--output_dir is needed: the pruned model and the resumable state go there")
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if args.cost == "latency" and not args.latency_look_up_table:
        raise UserError("--cost latency needs --latency_look_up_table TABLE.json "
                        "(build one with tools/build_latency_table.py, or use --cost macs)")
    if not (args.pretrained or args.pretrained_path):
        raise UserError("nvit_prune.py prunes a pretrained model: pass --pretrained-path FILE "
                        "or --pretrained (timm's weights of --model)")
    builders.check_loss_args(args)
    utils.require_wandb(args)


def check_label_free(args, config: pruning.PruningConfig) -> None:
    """A gradient saliency of the feature distance needs a student that differs from the
    full model before the first prune step: its drop path or dropout."""
    needs_gradients = pruning.saliency.CRITERIA_BY_NAME[config.criterion].needs_gradients
    if builders.label_free(args) and needs_gradients \
            and not (args.drop_path > 0 or args.drop > 0 or args.attn_drop > 0):
        raise UserError(f"--distill-target features with the {config.criterion} saliency needs "
                        f"--drop-path (default 0.1), --drop or --attn-drop > 0: until the first "
                        f"prune step the student equals the full model, and only its "
                        f"stochastic layers give the feature distance a gradient to score")


def load_dense_model(args, nb_classes: int):
    frame = dict(builders.model_kwargs(args, nb_classes), token_scale=args.token_scale)
    if args.pretrained_path:
        return models.build_model(args.model, checkpoint=args.pretrained_path, **frame)
    return models.build_model(args.model, pretrained=True, **frame)


def unit_scales(args, config: pruning.PruningConfig, cost, model) -> dict[str, float]:
    """--unit-scales: the pruning config's, or derived from the model and its cost."""
    if args.unit_scales == "config":
        return config.scales
    try:
        scales = pruning.auto_scales(cost, model.dims, config.criterion, config.group_sizes,
                                     QKV_UNIT_FLAGS[args.qk_v_units])
    except ValueError as e:
        raise UserError(f"--unit-scales auto: {e}") from None
    print("unit scales (auto, from the model's " + args.cost + "): "
          + ", ".join(f"{k} {v:.3g}" for k, v in scales.items()))
    return scales


def attach_pruner(model, cost, config: pruning.PruningConfig, budget: int | None,
                  target: float, args):
    """Gates on the model, the saliency and the global pruner the flags describe, aiming at
    `target` (the first of several)."""
    gates = pruning.Gates.attach(model, qkv_units=QKV_UNIT_FLAGS[args.qk_v_units],
                         emb_saliency=args.emb_saliency)
    saliency = pruning.Saliency(gates, config.criterion, unit_scales(args, config, cost, model),
                                config.momentum, args.seed)
    try:
        pruner = pruning.GlobalPruner(gates, saliency, cost, target, args.prune_per_iter,
                              config.group_sizes, args.latency_regularization, budget,
                              pace=args.group_size)
    except ValueError as e:
        raise UserError(f"--pruning_config: {e}") from None
    return gates, saliency, pruner


def run_settings(args, config: pruning.PruningConfig) -> dict:
    """What a resumed run must share with the original for its replay to be exact."""
    keys = ("batch_size", "grad_accum_steps", "interval_prune", "prune_per_iter", "group_size",
            "prune_dict", "cost", "latency_target", "latency_regularization", "seed", "data_set",
            "input_size",
            "kl_loss_coeff", "original_loss_coeff", "kl_tau", "qk_v_units", "emb_saliency",
            "pruning_lr", "student_eval", "token_scale", "base_loss_head", "distill_target",
            "distill_loss", "distill_tokens", "unit_scales")
    settings = {k: getattr(args, k) for k in keys}
    targets = flags.cost_targets(args.latency_target)  # one: a number, as states always held
    settings["latency_target"] = targets[0] if len(targets) == 1 else list(targets)
    return checkpoints.plain({"config": config.as_dict(), "world_size": utils.get_world_size(),
                              **settings})


# run settings added since pruning states were first written, with the value older runs had
SETTINGS_BEFORE_THEY_EXISTED = {"grad_accum_steps": 1, "distill_target": "logits",
                                "distill_loss": "cosine", "distill_tokens": "pooled",
                                "unit_scales": "config"}


def check_resumable(ckpt: dict, source: str, original, settings: dict) -> None:
    if "pruner" not in ckpt:
        raise UserError(f"--resume {source} is not a pruning state file "
                        f"({checkpoints.PRUNING_STATE_FILE})")
    if not same_model(ckpt["original_dims"], original):
        raise UserError(f"--resume {source} belongs to a run on another model")
    if has_split_qkv(ckpt["model"]):
        raise UserError(f"--resume {source} was written by an nvit before q, k and v became one "
                        f"projection and cannot be continued exactly; start the run again")
    saved = {**SETTINGS_BEFORE_THEY_EXISTED, **ckpt["settings"]}
    if isinstance(saved.get("config"), dict):  # unit kinds added since (SigLIP's pool MLP)
        config = saved["config"]  # had the defaults' group size and scale
        saved["config"] = {**config, **{key: {**default, **config[key]} for key, default in (
            ("group_sizes", pruning.DEFAULT_GROUP_SIZES), ("scales", pruning.DEFAULT_SCALES))
            if isinstance(config.get(key), dict)}}
    changed = [k for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"--resume {source} was made with other settings ({', '.join(changed)}); "
                        f"resume with the same flags, or start a new --output_dir")


def same_model(saved: dict, original) -> bool:
    """Whether a state's original dims are this run's model: a field the state lacks (added
    to the dims since it was written) has the value that older models had."""
    try:
        then = models.dims_from_dict(saved)
    except UserError:
        return False
    def normal(d):
        return d.with_family_defaults() if isinstance(d, models.Dims) else d
    return normal(then) == normal(original)


def not_reached_reason(loop: pruning.PruningLoop) -> str:
    if loop.stuck:
        return "the minimum widths (one group of each kind per block) are reached"
    if loop.pruner.budget_spent:
        return (f"the --prune_dict budget of {loop.pruner.max_steps} prune steps "
                f"(N // prune_per_iter + 1) is spent")
    return "the run ended first (more --epochs, or a larger --prune_per_iter)"


def check_cost_model(cost, dims, args, device, amp_dtype) -> None:
    """A latency table must describe this model (else refused) and should describe this
    device and precision (else a warning)."""
    source = f"--model {args.model} " + (f"--checkpoint {args.pretrained_path} "
                                         if args.pretrained_path else "")
    source += f"--input-size {args.input_size}"
    scale = "" if isinstance(dims, models.SwinDims) else \
        f" --token-scale {str(args.token_scale).lower()}"
    advice = (f"build a table for this model (tools/build_latency_table.py {source}{scale} "
              f"--runtime {args.runtime})")
    if isinstance(cost, pruning.LatencyTable) and cost.runtime != args.runtime:
        raise UserError(f"the latency table was timed in {cost.runtime}, this run deploys to "
                        f"{args.runtime}; {advice}", field="runtime")
    note = cost.frame_note(dims)
    if note:
        raise UserError(f"{note}; {advice}", field="latency_table")
    deployed = pruning.deploy_dtype(args.runtime, amp_dtype)
    note = cost.settings_note(device.type, pruning.precision_name(deployed),
                              torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if note:
        print(f"warning: {note}")
    coverage = cost.coverage_note(dims)
    if coverage:
        raise UserError(f"the latency table does not cover this model: {coverage}; {advice}",
                        field="latency_table")


def check_reachable(pruner: pruning.GlobalPruner, targets: tuple[float, ...], args) -> None:
    min_ratio = pruner.minimum_ratio()
    if min_ratio > targets[-1] > 0:
        raise UserError(f"--latency_target {targets[-1]:g} cannot be reached: the minimum "
                        f"widths (one group of each kind per block) give {min_ratio:.3f} of the "
                        f"original {args.cost}")


def resume_run(path: str, original, settings: dict, model, loop: pruning.PruningLoop,
               recorder: PruneRecorder, optimizer, scheduler, scaler) -> None:
    """Everything a pruning state holds, back in place: weights, masks, saliency, pruner,
    position, optimizer, the run's records."""
    ckpt = models.read_checkpoint(path)
    check_resumable(ckpt, path, original, settings)
    model.load_state_dict(ckpt["model"])
    loop.load_state_dict(ckpt)
    checkpoints.restore_training_state(ckpt, path, optimizer, scheduler, scaler)
    recorder.restore(ckpt)
    print(f"resumed from {path}: epoch {loop.epoch}, iteration {loop.iteration}, "
          f"{loop.pruner.steps} prune steps done, cost ratio {loop.pruner.ratio():.3f}")


def check_replicas(gates: pruning.Gates, model, run: utils.Run, steps: int) -> None:
    """All ranks end with rank 0's masks and weights (a cheap end-of-run DDP check)."""
    if not utils.replicas_identical_tensors(gates.tensors()):
        raise RuntimeError("processes ended with different masks: pruning lost synchronisation")
    if not utils.replicas_identical(model):
        raise RuntimeError("processes ended with different weights: pruning lost "
                           "synchronisation (optimizer state cleared unlike rank 0's?)")
    print(f"all {run.world_size} processes hold identical masks and weights after {steps} "
          f"prune steps")


def measured_speed(args, original, compact_model, cost, device, amp_dtype) -> dict | None:
    """The compact model's speedup over the dense one timed here, beside what its MACs and
    the latency table promised (--speed-report-pairs 0: none)."""
    if not args.speed_report_pairs:
        return None
    speed = pruning.speed_report(models.model_class(original)(original).to(device),
                                 compact_model.eval(), device,
                         args.batch_size, pruning.deploy_dtype(args.runtime, amp_dtype),
                         args.speed_report_pairs, repeats=3,
                         table=cost if isinstance(cost, pruning.LatencyTable) else None,
                         runtime=args.runtime)
    print("\n".join(pruning.report_lines(speed)))
    return speed


# -------------------------------------------------------------------------------- main
def main(args) -> None:
    check_args(args)
    targets = flags.cost_targets(args.latency_target)
    config = pruning_config(args)
    budget = prune_budget(args)
    table = read_json_file(args.latency_look_up_table, "--latency_look_up_table") \
        if args.cost == "latency" else None
    resume = checkpoints.resume_path(args.resume, args.output_dir, checkpoints.PRUNING_STATE_FILE)
    run = utils.setup_run(args)
    device = run.device
    builders.resolve_input_size(args, None, args.pretrained_path or None)
    if config.ignored:
        print(f"--pruning_config {args.pruning_config}: keys without effect, as in the reference "
              f"(set by flags here, or unused): {', '.join(config.ignored)}")

    check_label_free(args, config)
    train_loader, val_loader, nb_classes, train_sampler = builders.build_loaders(args)
    model = builders.for_objective(
        args, load_dense_model(args, builders.model_classes(args, nb_classes))).to(device)
    original = model.dims
    amp_dtype = amp_dtype_for(device, args.amp, args.amp_dtype)
    cost = pruning.build_cost_model(args.cost, original, table)
    check_cost_model(cost, original, args, device, amp_dtype)
    full_model = builders.frozen_copy(model) if args.kl_loss_coeff > 0 else None
    gates, saliency, pruner = attach_pruner(model, cost, config, budget, targets[0], args)
    check_reachable(pruner, targets, args)

    model_without_ddp = model
    model = builders.distributed_model(args, model, device)
    # compiled with the gates in it: a prune step changes their values, never a shape, so
    # it does not recompile (models.revit.StreamNorm.masked)
    model = builders.compile_model(args, model)
    optimizer = builders.build_optimizer(args, model_without_ddp)
    scheduler = builders.build_scheduler(args, optimizer)
    scaler = make_grad_scaler(device, amp_dtype)
    mixup_fn = builders.build_mixup(args, nb_classes)
    criterion = builders.build_criterion(args, nb_classes, mixup_fn, device, kl_tau=args.kl_tau,
                                         per_head=False, full_model=full_model,
                                         student=model_without_ddp)
    if builders.label_free(args):
        score = functools.partial(evaluate_features, val_loader, model, criterion, device,
                                  amp_dtype, run.sharded_eval)
    else:
        score = functools.partial(evaluate, val_loader, model, device, amp_dtype, run.sharded_eval)

    settings = run_settings(args, config)
    recorder = PruneRecorder(run.output_dir, run.is_main, args, settings, original,
                             builders.total_batch(args), len(targets) > 1, score)
    save_steps, save_seconds = flags.save_cadence(args.save_every)
    loop = pruning.PruningLoop(model_without_ddp, gates, saliency, pruner, criterion, optimizer,
                       interval=args.interval_prune,
                       iters_per_epoch=len(train_loader) // args.grad_accum_steps,
                       student_eval=args.student_eval, train_module=model,
                       save_every_steps=save_steps, save_every_seconds=save_seconds,
                       on_prune=recorder.on_prune, later_targets=targets[1:])
    recorder.follow(loop, model_without_ddp, optimizer, scheduler, scaler)
    if resume:
        resume_run(resume, original, settings, model_without_ddp, loop, recorder, optimizer,
                   scheduler, scaler)

    # every input has passed: from here on the folder is ours
    utils.claim_output_dir(run, args=args, check=functools.partial(
        checkpoints.check_run_files, resume, run.output_dir, checkpoints.PRUNING_STATE_FILE,
        checkpoints.PRUNING_RUN_FILES))
    recorder.open()  # on resume from the state: a kill after the state lost nothing
    if not resume:
        recorder.dense_scored(score())
    elif recorder.unfinished_epoch() is not None:  # killed between its last step and its end
        recorder.epoch_ended(recorder.unfinished_epoch(), recorder.epoch_means.averages(), score())

    # Ctrl-C / SIGTERM: every rank stops after the next step, the state is saved (--resume)
    previous = {s: signal.signal(s, loop.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stats = None
    start_epoch = loop.epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            if loop.done or loop.stop_agreed():
                break
            skip = loop.iteration if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, skip=skip * args.batch_size * args.grad_accum_steps)
            scheduler.step(0 if args.pruning_lr == "constant" else epoch)
            loop.set_phase()
            recorder.epoch_started(resumed_in_it=skip > 0)
            train_stats = train_one_epoch(
                model, criterion, train_loader, optimizer, device, epoch, scaler, amp_dtype,
                args.clip_grad, args.clip_mode, None, mixup_fn, args.print_freq, start_iter=skip,
                seed_fn=utils.seed_fn(args.seed, epoch, run.rank),
                accum_steps=args.grad_accum_steps, means=recorder.epoch_means,
                **loop.hooks(epoch))
            if loop.stop_agreed():
                break
            stats = score()
            recorder.epoch_ended(epoch, train_stats, stats)
        if loop.stop_requested:  # still under the handlers: a second signal cannot cut it short
            recorder.stopped()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if args.distributed:
        check_replicas(gates, model_without_ddp, run, pruner.steps)
    if stats is None:  # resumed after the end, or ended by the prune step: score the final masks
        stats = score()
    ratio = pruner.ratio()
    if run.is_main:
        compact_model = pruning.compact(model_without_ddp)
        speed = measured_speed(args, original, compact_model, cost, device, amp_dtype)
        recorder.finished(compact_model, ratio, stats, speed,
                          cost.meta if isinstance(cost, pruning.LatencyTable) else None)
    recorder.close()
    print(f"pruned model: {args.cost} ratio {ratio:.4f} of the original, {score_text(stats)}"
          f"{recorder.dense_note()}; dims {json.dumps(gates.widths())}")
    print(f"wrote {run.output_dir / checkpoints.PRUNED_FILE}")
    if ratio > targets[-1] > 0:
        raise UserError(f"--latency_target {targets[-1]:g} not reached: {args.cost} ratio "
                        f"{ratio:.4f}, {not_reached_reason(loop)}; the smallest "
                        f"model reached was saved")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())
