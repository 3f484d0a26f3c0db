"""Prune a pretrained DeiT toward a latency (or MACs/params) target and write a compact model.

    python nvit_prune.py --model deit_base_distilled_patch16_224 --pretrained --pruning \
        --pruning_config configs/nvit_reference.json --latency_look_up_table TABLE.json \
        --latency_target 0.54 --data-path DIR --output_dir OUT ...
    torchrun --nproc_per_node=8 nvit_prune.py ...            (same flags, one process per GPU)

The flags mean what they meant in the NViT reference's main_full_global_latency.py. The
weights train on original_loss_coeff * DeiT loss, plus, from the first prune step on,
kl_loss_coeff * KL(student || frozen full model) at --kl-tau; with --student_eval the
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

import copy
import json
import signal
from pathlib import Path

import torch

import builders
import checkpoints
import flags
import models
import utils
from atomic import write_text_atomic
from engine import amp_dtype_for, evaluate, make_grad_scaler, train_one_epoch
from errors import Stopped, UserError
from models.checkpoint import has_split_qkv
from plots import plot_pareto, plot_widths
from pruning import Gates, Saliency, compact
from pruning.config import PruningConfig, parse_config
from pruning.cost import LatencyTable, build_cost_model, precision_name
from pruning.latency import report_lines, speed_report
from pruning.gates import EMB_SALIENCY, QKV_UNITS
from pruning.loop import PruningLoop
from pruning.pruner import DEFAULT_PACE, GlobalPruner

QKV_UNIT_FLAGS = {"shared": "shared", "per-head": "per_head"}
assert set(QKV_UNIT_FLAGS.values()) == set(QKV_UNITS)


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
    flags.add_pruning_args(p, pace=DEFAULT_PACE, emb_saliency=EMB_SALIENCY,
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


def pruning_config(args) -> PruningConfig:
    if not args.pruning_config:
        return PruningConfig()
    data = read_json_file(args.pruning_config, "--pruning_config")
    try:
        return parse_config(data)
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


def load_dense_model(args, nb_classes: int):
    frame = dict(builders.model_kwargs(args, nb_classes), token_scale=args.token_scale)
    if args.pretrained_path:
        return models.build_model(args.model, checkpoint=args.pretrained_path, **frame)
    return models.build_model(args.model, pretrained=True, **frame)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    full = copy.deepcopy(model).eval()
    for p in full.parameters():
        p.requires_grad_(False)
    return full


def attach_pruner(model, cost, config: PruningConfig, budget: int | None, target: float, args):
    """Gates on the model, the saliency and the global pruner the flags describe, aiming at
    `target` (the first of several)."""
    gates = Gates.attach(model, qkv_units=QKV_UNIT_FLAGS[args.qk_v_units],
                         emb_saliency=args.emb_saliency)
    saliency = Saliency(gates, config.criterion, config.scales, config.momentum, args.seed)
    try:
        pruner = GlobalPruner(gates, saliency, cost, target, args.prune_per_iter,
                              config.group_sizes, args.latency_regularization, budget,
                              pace=args.group_size)
    except ValueError as e:
        raise UserError(f"--pruning_config: {e}") from None
    return gates, saliency, pruner


def run_settings(args, config: PruningConfig) -> dict:
    """What a resumed run must share with the original for its replay to be exact."""
    keys = ("batch_size", "grad_accum_steps", "interval_prune", "prune_per_iter", "group_size",
            "prune_dict", "cost", "latency_target", "latency_regularization", "seed", "data_set",
            "input_size",
            "kl_loss_coeff", "original_loss_coeff", "kl_tau", "qk_v_units", "emb_saliency",
            "pruning_lr", "student_eval", "token_scale", "base_loss_head")
    settings = {k: getattr(args, k) for k in keys}
    targets = flags.cost_targets(args.latency_target)  # one: a number, as states always held
    settings["latency_target"] = targets[0] if len(targets) == 1 else list(targets)
    return checkpoints.plain({"config": config.as_dict(), "world_size": utils.get_world_size(),
                              **settings})


# run settings added since pruning states were first written, with the value older runs had
SETTINGS_BEFORE_THEY_EXISTED = {"grad_accum_steps": 1}


def check_resumable(ckpt: dict, source: str, original, settings: dict) -> None:
    if "pruner" not in ckpt:
        raise UserError(f"--resume {source} is not a pruning state file "
                        f"({checkpoints.PRUNING_STATE_FILE})")
    if ckpt["original_dims"] != original.to_dict():
        raise UserError(f"--resume {source} belongs to a run on another model")
    if has_split_qkv(ckpt["model"]):
        raise UserError(f"--resume {source} was written by an nvit before q, k and v became one "
                        f"projection and cannot be continued exactly; start the run again")
    saved = {**SETTINGS_BEFORE_THEY_EXISTED, **ckpt["settings"]}
    changed = [k for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"--resume {source} was made with other settings ({', '.join(changed)}); "
                        f"resume with the same flags, or start a new --output_dir")


# ----------------------------------------------------------------------------- outputs
def width_summary(widths: dict) -> str:
    return (f"emb {widths['embed_dim']}  heads {sum(widths['num_heads'])}  "
            f"qk {widths['qk_dim']}  v {widths['v_dim']}  mlp {sum(widths['mlp_dim'])}")


def widths_of(dims) -> dict:
    return {k: getattr(dims, k) for k in ("embed_dim", "num_heads", "qk_dim", "v_dim", "mlp_dim")}


def prune_step_line(record: dict, loop: PruningLoop, args) -> str:
    target = (record.get("targets_reached") or [loop.pruner.target])[-1]
    done = len(loop.history)
    drop = (1 - record["ratio"]) / record["step"]
    mean_seconds = sum(r["seconds"] for r in loop.history) / done
    eta = "?" if drop <= 0 or target == 0 else \
        f"{max(0.0, (record['ratio'] - target) / drop) * mean_seconds:.0f}s"
    removed = ", ".join(f"{k} {n}" for k, n in record["removed_groups"].items() if n) or "none"
    return (f"prune step {record['step']}: {args.cost} ratio {record['ratio']:.4f} (target "
            f"{target})  removed groups: {removed}  {width_summary(record['dims'])}  loss "
            f"{record['loss']:.4f} (kl {record.get('loss_kl', 0.0):.4g}, deit "
            f"{record.get('loss_deit', 0.0):.4g})  img/s {record['img_s']:.1f}  eta {eta}")


def log_records(top1_dense: float | None, prune_steps: list[dict], epochs: list[dict],
                speed: dict | None = None) -> list[dict]:
    """log.txt of a pruning run, one JSON line each, in the order they happened: the dense
    model's top-1, every prune step (cost ratio, widths, loss parts, lr, img/s), every epoch
    (top-1, cost ratio, training loss parts) and the final speed report."""
    lines = [{"kind": "prune_step", **r} for r in prune_steps] + \
        [{"kind": "epoch", **r} for r in epochs]
    lines.sort(key=lambda r: (r["epoch"], r["kind"] == "epoch", r.get("iteration", 0)))
    head = [] if top1_dense is None else [{"kind": "dense", "test_acc1": top1_dense}]
    return head + lines + ([] if speed is None else [{"kind": "speed", **speed}])


def not_reached_reason(loop: PruningLoop) -> str:
    if loop.stuck:
        return "the minimum widths (one group of each kind per block) are reached"
    if loop.pruner.budget_spent:
        return (f"the --prune_dict budget of {loop.pruner.max_steps} prune steps "
                f"(N // prune_per_iter + 1) is spent")
    return "the run ended first (more --epochs, or a larger --prune_per_iter)"


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
    device, output_dir = run.device, run.output_dir
    builders.resolve_input_size(args, None, args.pretrained_path or None)
    if config.ignored:
        print(f"--pruning_config {args.pruning_config}: keys without effect, as in the reference "
              f"(set by flags here, or unused): {', '.join(config.ignored)}")

    train_loader, val_loader, nb_classes, train_sampler = builders.build_loaders(args)
    model = load_dense_model(args, nb_classes).to(device)
    original = model.dims
    cost = build_cost_model(args.cost, original, table)
    note = cost.frame_note(original)
    if note:
        raise UserError(f"{note}; build a table for this model (tools/build_latency_table.py "
                        f"--model {args.model} --input-size {args.input_size} --token-scale "
                        f"{str(args.token_scale).lower()})", field="latency_table")
    amp_dtype = amp_dtype_for(device, args.amp, args.amp_dtype)
    note = cost.settings_note(device.type, precision_name(amp_dtype),
                              torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if note:
        print(f"warning: {note}")
    coverage = cost.coverage_note(original)
    if coverage:
        raise UserError(f"the latency table does not cover this model: {coverage}",
                        field="latency_table")
    full_model = frozen_copy(model) if args.kl_loss_coeff > 0 else None

    gates, saliency, pruner = attach_pruner(model, cost, config, budget, targets[0], args)
    min_ratio = pruner.minimum_ratio()
    if min_ratio > targets[-1] > 0:
        raise UserError(f"--latency_target {targets[-1]:g} cannot be reached: the minimum "
                        f"widths (one group of each kind per block) give {min_ratio:.3f} of the "
                        f"original {args.cost}")

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

    settings = run_settings(args, config)
    run_id, top1_dense = checkpoints.new_run_id(), None

    epoch_log: list[dict] = []
    scalars, speed = None, None

    def save_state() -> None:
        if run.is_main:
            checkpoints.save_pruning_state(output_dir / checkpoints.PRUNING_STATE_FILE,
                                           model_without_ddp, loop, optimizer, scheduler, scaler,
                                           settings, original, args, run_id, top1_dense,
                                           epoch_log)
        loop.mark_saved()

    def write_logs() -> None:
        """dims_history.json and log.txt, whole, from what the state holds."""
        if run.is_main:
            write_text_atomic(output_dir / checkpoints.HISTORY_FILE, json.dumps(
                {"original": widths_of(original), "steps": loop.history}, indent=1))
            write_text_atomic(output_dir / checkpoints.LOG_FILE, utils.json_lines(
                log_records(top1_dense, loop.history, epoch_log, speed)))

    def save_target_models(record: dict) -> None:
        """Several targets: the compact model at each one reached, scored now (the student is
        evaluated mid-epoch, then put back in its training mode), and pareto.png."""
        stats = evaluate(val_loader, model, device, amp_dtype, run.sharded_eval)
        loop.set_phase()
        record["target_models"] = [
            {"target": t, "file": checkpoints.target_file(t), "ratio": record["ratio"],
             "test_acc1": stats["acc1"], "test_acc5": stats["acc5"]}
            for t in record["targets_reached"]]
        for entry in record["target_models"]:
            print(f"target {entry['target']:g} reached: {args.cost} ratio {record['ratio']:.4f}, "
                  f"top-1 {stats['acc1']:.2f}%; wrote {output_dir / entry['file']}")
        if not run.is_main:
            return
        compact_model = compact(model_without_ddp)
        for entry in record["target_models"]:
            checkpoints.save_model_file(
                output_dir / entry["file"], compact_model, args, run_id=run_id,
                original_dims=original.to_dict(), cost=args.cost, cost_ratio=record["ratio"],
                target=entry["target"], top1_dense=top1_dense, top1_pruned=stats["acc1"])
        points = [e for r in loop.history for e in r.get("target_models", [])]
        plot_pareto(points, top1_dense, args.cost, output_dir / checkpoints.PARETO_FILE)

    def on_prune(record: dict) -> None:
        record["img_s"] = (args.interval_prune * builders.total_batch(args)
                           / max(record["seconds"], 1e-9))
        print(prune_step_line(record, loop, args), flush=True)
        if len(targets) > 1 and record.get("targets_reached"):
            save_target_models(record)
        if loop.save_due() or record.get("target_models"):
            save_state()
        write_logs()
        scalars.add(record, record["step"], axis="prune/step", prefix="prune/")

    save_steps, save_seconds = flags.save_cadence(args.save_every)
    loop = PruningLoop(model_without_ddp, gates, saliency, pruner, criterion, optimizer,
                       interval=args.interval_prune,
                       iters_per_epoch=len(train_loader) // args.grad_accum_steps,
                       student_eval=args.student_eval, train_module=model,
                       save_every_steps=save_steps, save_every_seconds=save_seconds,
                       on_prune=on_prune, later_targets=targets[1:])
    if resume:
        ckpt = models.read_checkpoint(resume)
        check_resumable(ckpt, resume, original, settings)
        model_without_ddp.load_state_dict(ckpt["model"])
        loop.load_state_dict(ckpt)
        checkpoints.restore_training_state(ckpt, resume, optimizer, scheduler, scaler)
        run_id = ckpt.get("run_id") or run_id
        top1_dense = ckpt.get("top1_dense")
        epoch_log = list(ckpt.get("epoch_log") or [])
        print(f"resumed from {resume}: epoch {loop.epoch}, iteration {loop.iteration}, "
              f"{pruner.steps} prune steps done, cost ratio {pruner.ratio():.3f}")
        del ckpt

    # every input has passed: from here on the folder is ours
    utils.claim_output_dir(run, check=lambda: checkpoints.check_run_files(
        resume, output_dir, checkpoints.PRUNING_STATE_FILE, checkpoints.PRUNING_RUN_FILES),
        args=args)
    scalars = utils.scalar_log(output_dir if run.is_main else None, args)
    if not resume:
        dense_stats = evaluate(val_loader, model, device, amp_dtype, run.sharded_eval)
        top1_dense = dense_stats["acc1"]
        print(f"before pruning: top-1 {dense_stats['acc1']:.2f}%  top-5 {dense_stats['acc5']:.2f}%")
    write_logs()  # on resume from the state: a kill after the state lost nothing

    # Ctrl-C / SIGTERM: finish the step, save the state, stop (resume with --resume)
    def request_stop(signum, frame) -> None:
        loop.stop_requested = True
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
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
            train_stats = train_one_epoch(
                model, criterion, train_loader, optimizer, device, epoch, scaler, amp_dtype,
                args.clip_grad, args.clip_mode, None, mixup_fn, args.print_freq, start_iter=skip,
                seed_fn=utils.seed_fn(args.seed, epoch, run.rank),
                accum_steps=args.grad_accum_steps, **loop.hooks(epoch))
            if loop.stop_agreed():
                break
            stats = evaluate(val_loader, model, device, amp_dtype, run.sharded_eval)
            print(f"Epoch {epoch}: student top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%"
                  f"  {args.cost} ratio {pruner.ratio():.4f}")
            record = {"epoch": epoch, "ratio": pruner.ratio(), "prune_steps": pruner.steps,
                      **{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"test_{k}": v for k, v in stats.items()}}
            epoch_log.append(record)
            if not loop.done:
                save_state()
            write_logs()
            scalars.add(record, epoch, axis="epoch/epoch", prefix="epoch/")
        if loop.stop_requested:  # still under the handlers: a second signal cannot cut it short
            save_state()
            utils.barrier()  # no rank ends (its launcher would then stop rank 0) before the save
            raise Stopped(f"stopped on request after {pruner.steps} prune steps; the state is "
                          f"in {output_dir / checkpoints.PRUNING_STATE_FILE} (continue with "
                          f"--resume)")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if args.distributed:
        if not utils.replicas_identical_tensors(gates.tensors()):
            raise RuntimeError("processes ended with different masks: pruning lost synchronisation")
        if not utils.replicas_identical(model_without_ddp):
            raise RuntimeError("processes ended with different weights: pruning lost "
                               "synchronisation (optimizer state cleared unlike rank 0's?)")
        print(f"all {run.world_size} processes hold identical masks and weights after "
              f"{pruner.steps} prune steps")
    if stats is None:  # resumed after the end, or ended by the prune step: score the final masks
        stats = evaluate(val_loader, model, device, amp_dtype, run.sharded_eval)
    ratio = pruner.ratio()
    if run.is_main:
        compact_model = compact(model_without_ddp)
        if args.speed_report_pairs:  # promised against delivered, on this device
            speed = speed_report(models.ReViT(original).to(device), compact_model.eval(), device,
                                 args.batch_size, amp_dtype, args.speed_report_pairs, repeats=3,
                                 table=cost if isinstance(cost, LatencyTable) else None)
            print("\n".join(report_lines(speed)))
            write_logs()
        checkpoints.save_model_file(
            output_dir / checkpoints.PRUNED_FILE, compact_model, args,
            run_id=run_id, original_dims=original.to_dict(), cost=args.cost, cost_ratio=ratio,
            top1_dense=top1_dense, top1_pruned=stats["acc1"], speed=speed)
        if loop.history:
            plot_widths(widths_of(original), loop.history[-1]["dims"], output_dir / "widths.png")
    scalars.close()
    dense_note = "" if top1_dense is None else f" (dense {top1_dense:.2f}%)"
    print(f"pruned model: {args.cost} ratio {ratio:.4f} of the original, top-1 {stats['acc1']:.2f}%"
          f"{dense_note}; dims {json.dumps(gates.widths())}")
    print(f"wrote {output_dir / checkpoints.PRUNED_FILE}")
    if ratio > targets[-1] > 0:
        raise UserError(f"--latency_target {targets[-1]:g} not reached: {args.cost} ratio "
                        f"{ratio:.4f}, {not_reached_reason(loop)}; the smallest "
                        f"model reached was saved")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())
