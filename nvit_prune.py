"""Prune a pretrained DeiT toward a latency (or MACs/params) target and write a compact model.

    python nvit_prune.py --model deit_base_distilled_patch16_224 --pretrained --pruning \
        --pruning_config configs/nvit_reference.json --latency_look_up_table TABLE.json \
        --latency_target 0.54 --data-path DIR --output_dir OUT ...
    torchrun --nproc_per_node=8 nvit_prune.py ...            (same flags, one process per GPU)

Between prune steps the weights train on kl_loss_coeff * KL(student || frozen full model)
+ original_loss_coeff * DeiT loss. Outputs in --output_dir: pruned_checkpoint.pth (the
compact model, loadable by revit_scratch.py --finetune/--eval), pruning_state.pth (for
--resume), dims_history.json and widths.png.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

import builders
import models
import utils
from engine import amp_dtype_for, evaluate, make_grad_scaler, train_one_epoch
from errors import UserError
from pruning import CRITERIA, KINDS, Gates, Saliency, compact
from pruning.cost import build_cost_model
from pruning.optim_state import clear_pruned_state
from pruning.pruner import DEFAULT_GROUP_SIZES, GlobalPruner
from revit_scratch import get_args_parser as training_args_parser
from revit_scratch import str2bool

STATE_FILE = "pruning_state.pth"
PRUNED_FILE = "pruned_checkpoint.pth"
CONFIG_KEYS = {"criterion", "group_sizes", "scales", "momentum"}


def get_args_parser():
    p = training_args_parser(add_help=False)
    import argparse
    parser = argparse.ArgumentParser("NViT global structural pruning", parents=[p])
    g = parser.add_argument_group("pruning")
    g.add_argument("--pruning", action="store_true", help="prune (the reference's switch)")
    g.add_argument("--pruning_config", "--pruning-config", default="",
                   help="JSON: criterion, group_sizes, scales, momentum (configs/nvit_reference.json)")
    g.add_argument("--prune_per_iter", "--prune-per-iter", default=32, type=int,
                   help="units removed at each prune step")
    g.add_argument("--interval_prune", "--interval-prune", default=100, type=int,
                   help="training iterations between prune steps")
    g.add_argument("--prune_dict", "--prune-dict", default='{"Global": 39000}',
                   help='JSON {"Global": N}: at most N units removed in all')
    g.add_argument("--cost", default="latency", choices=["latency", "macs", "params"])
    g.add_argument("--latency_target", "--latency-target", default=0.54, type=float,
                   help="stop when cost <= target * cost of the original model")
    g.add_argument("--latency_regularization", "--latency-regularization", default=5e-4, type=float,
                   help="lambda in score - lambda * cost drop")
    g.add_argument("--latency_look_up_table", "--latency-look-up-table", default="",
                   help="JSON table from tools/build_latency_table.py (or the reference format)")
    g.add_argument("--pruning_exit", "--pruning-exit", action="store_true",
                   help="stop as soon as the target is reached (else keep training the masked model)")
    g.add_argument("--student_eval", "--student-eval", default=True, type=str2bool,
                   help="evaluate the masked student at each epoch end")
    return parser


# ------------------------------------------------------------------------------ inputs
def read_json_file(path: str, flag: str):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{flag} {path} is not valid JSON: {e}") from None


def pruning_config(args) -> dict:
    config = {"criterion": "hessian", "group_sizes": dict(DEFAULT_GROUP_SIZES), "scales": {},
              "momentum": 0.9}
    if not args.pruning_config:
        return config
    data = read_json_file(args.pruning_config, "--pruning_config")
    if not isinstance(data, dict) or set(data) - CONFIG_KEYS:
        raise UserError(f"--pruning_config {args.pruning_config}: expected an object with keys "
                        f"{sorted(CONFIG_KEYS)}, got {sorted(data) if isinstance(data, dict) else data!r}")
    if data.get("criterion", "hessian") not in CRITERIA:
        raise UserError(f"--pruning_config: criterion must be one of {CRITERIA}")
    for key in ("group_sizes", "scales"):
        value = data.get(key, {})
        if not isinstance(value, dict) or set(value) - set(KINDS) or \
                not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
            raise UserError(f"--pruning_config: {key} must map kinds {KINDS} to positive numbers")
        if key == "group_sizes" and not all(float(v).is_integer() for v in value.values()):
            raise UserError("--pruning_config: group_sizes must be integers")
    momentum = data.get("momentum", 0.9)
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise UserError("--pruning_config: momentum must be in [0, 1)")
    config.update(data)
    config["group_sizes"] = {**DEFAULT_GROUP_SIZES, **{k: int(v) for k, v in
                                                       data.get("group_sizes", {}).items()}}
    return config


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
    for flag, value in (("--eval", args.eval), ("--finetune", args.finetune), ("--EMB", args.EMB),
                        ("--dims", args.dims), ("--scratch", args.scratch)):
        if value:
            raise UserError(f"{flag} is a revit_scratch.py flag; nvit_prune.py prunes the model "
                            f"given by --pretrained-path/--pretrained")
    if not args.output_dir:
        raise UserError("--output_dir is needed: the pruned model and the resumable state go there")
    if not 0.0 < args.latency_target < 1.0:
        raise UserError(f"--latency_target must be in (0, 1) (a fraction of the original cost), "
                        f"got {args.latency_target}")
    if args.prune_per_iter <= 0 or args.interval_prune <= 0:
        raise UserError("--prune_per_iter and --interval_prune must be positive")
    if args.cost == "latency" and not args.latency_look_up_table:
        raise UserError("--cost latency needs --latency_look_up_table TABLE.json "
                        "(build one with tools/build_latency_table.py, or use --cost macs)")
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if not (args.pretrained or args.pretrained_path):
        raise UserError("nvit_prune.py prunes a pretrained model: pass --pretrained-path FILE "
                        "or --pretrained (timm's weights of --model)")


def load_dense_model(args, nb_classes: int):
    frame = dict(img_size=args.input_size, num_classes=nb_classes, drop_rate=args.drop,
                 attn_drop_rate=args.attn_drop, drop_path_rate=args.drop_path)
    if args.patch_size:
        frame["patch_size"] = args.patch_size
    if args.pretrained_path:
        return models.build_model(args.model, checkpoint=args.pretrained_path, **frame)
    return models.build_model(args.model, pretrained=True, **frame)


def run_settings(args, config: dict) -> dict:
    """What a resumed run must share with the original for its replay to be exact."""
    return {"config": config, "batch_size": args.batch_size, "world_size": utils.get_world_size(),
            "interval_prune": args.interval_prune, "prune_per_iter": args.prune_per_iter,
            "prune_dict": args.prune_dict, "cost": args.cost, "latency_target": args.latency_target,
            "latency_regularization": args.latency_regularization, "seed": args.seed,
            "data_set": args.data_set, "input_size": args.input_size}


# ----------------------------------------------------------------------------- outputs
def save_pruned(model, output_dir: Path, args, extra: dict) -> None:
    """The compact model and its dims: what --finetune, --eval and build_model load."""
    dense = compact(model)
    utils.save_atomic({"model": dense.state_dict(), "dims": dense.dims.to_dict(),
                       "args": utils.plain(vars(args)), **extra}, output_dir / PRUNED_FILE)


def write_history(output_dir: Path, original: dict, steps: list) -> None:
    utils.write_text_atomic(output_dir / "dims_history.json",
                            json.dumps({"original": original, "steps": steps}, indent=1))


def width_summary(widths: dict) -> str:
    return (f"emb {widths['embed_dim']}  heads {sum(widths['num_heads'])}  "
            f"qk {widths['qk_dim']}  v {widths['v_dim']}  mlp {sum(widths['mlp_dim'])}")


def widths_of(dims) -> dict:
    return {k: getattr(dims, k) for k in ("embed_dim", "num_heads", "qk_dim", "v_dim", "mlp_dim")}


def freeze(gates: Gates) -> None:
    """No more gate gradients: pruning is over, or the criterion does not use them."""
    for t in gates.tensors():
        t.requires_grad_(False)
        t.grad = None


# -------------------------------------------------------------------------------- main
def main(args) -> None:
    check_args(args)
    config = pruning_config(args)
    budget = prune_budget(args)
    table = read_json_file(args.latency_look_up_table, "--latency_look_up_table") \
        if args.cost == "latency" else None
    resume = None
    if args.resume:
        resume = str(Path(args.output_dir) / STATE_FILE) if args.resume == "auto" else args.resume
        if not Path(resume).is_file():
            if args.resume != "auto":
                raise UserError(f"--resume {resume} does not exist")
            print(f"--resume: no {resume} yet, starting from the beginning")
            resume = None

    utils.init_distributed_mode(args)
    device = utils.resolve_device(args.device)
    sharded = args.distributed and args.dist_eval  # eval shards summed over ranks
    rank = utils.get_rank()
    utils.seed_everything(args.seed + rank)
    output_dir = utils.prepare_output_dir(args.output_dir)  # every rank checks it is writable
    is_main = utils.is_main_process()

    train_loader, val_loader, nb_classes, train_sampler = builders.build_loaders(args)
    model = load_dense_model(args, nb_classes).to(device)
    original = model.dims
    cost = build_cost_model(args.cost, original, table)
    note = getattr(cost, "frame_note", lambda d: None)(original)
    if note:
        print(f"warning: {note}")
    full_model = None
    if args.kl_loss_coeff > 0:
        full_model = copy.deepcopy(model).eval()
        for p in full_model.parameters():
            p.requires_grad_(False)

    gates = Gates.attach(model)
    saliency = Saliency(gates, config["criterion"], config["scales"], config["momentum"], args.seed)
    uses_gradients = config["criterion"] in ("hessian", "taylor")
    if not uses_gradients:
        freeze(gates)
    try:
        pruner = GlobalPruner(gates, saliency, cost, args.latency_target, args.prune_per_iter,
                              config["group_sizes"], args.latency_regularization, budget)
    except ValueError as e:
        raise UserError(f"--pruning_config: {e}") from None
    min_ratio = pruner.minimum_ratio()
    if min_ratio > args.latency_target:
        print(f"warning: the minimum widths give {min_ratio:.3f} of the original {args.cost}; "
              f"--latency_target {args.latency_target} cannot be reached")

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = amp_dtype_for(device, args.amp)
    optimizer = builders.build_optimizer(args, model_without_ddp)
    scheduler = builders.build_scheduler(args, optimizer)
    scaler = make_grad_scaler(device, amp_dtype)
    mixup_fn = builders.build_mixup(args, nb_classes)
    criterion = builders.build_criterion(args, nb_classes, mixup_fn, device, full_model=full_model)

    settings = run_settings(args, config)
    history: list[dict] = []
    state = {"epoch": 0, "iteration": 0, "done": False, "stuck": False}
    if resume:
        ckpt = models.read_checkpoint(resume)
        if "pruner" not in ckpt:
            raise UserError(f"--resume {resume} is not a pruning state file ({STATE_FILE})")
        if ckpt["original_dims"] != original.to_dict():
            raise UserError(f"--resume {resume} belongs to a run on another model")
        changed = [k for k, v in settings.items() if ckpt["settings"].get(k) != v]
        if changed:
            raise UserError(f"--resume {resume} was made with other settings ({', '.join(changed)}); "
                            f"resume with the same flags, or start a new --output_dir")
        model_without_ddp.load_state_dict(ckpt["model"])
        gates.load_state_dict(ckpt["masks"])
        saliency.load_state_dict(ckpt["saliency"])
        pruner.load_state_dict(ckpt["pruner"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        history = ckpt["history"]
        state.update({k: ckpt[k] for k in ("epoch", "iteration", "done", "stuck")})
        if state["done"]:
            freeze(gates)
        print(f"resumed from {resume}: epoch {state['epoch']}, iteration {state['iteration']}, "
              f"{pruner.steps} prune steps done, cost ratio {pruner.ratio():.3f}")
    elif is_main:
        utils.refuse_to_overwrite(output_dir, (STATE_FILE, PRUNED_FILE, "dims_history.json"))

    def save_state(epoch: int, iteration: int) -> None:
        if not is_main:
            return
        utils.save_atomic({
            "model": model_without_ddp.state_dict(), "masks": gates.state_dict(),
            "saliency": saliency.state_dict(), "pruner": pruner.state_dict(),
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "iteration": iteration, "done": state["done"],
            "stuck": state["stuck"], "history": history, "settings": utils.plain(settings),
            "original_dims": original.to_dict(), "args": utils.plain(vars(args)),
        }, output_dir / STATE_FILE)

    top1_dense = None
    if args.student_eval and not resume:
        dense_stats = evaluate(val_loader, model, device, amp_dtype, sharded)
        top1_dense = dense_stats["acc1"]
        print(f"before pruning: top-1 {dense_stats['acc1']:.2f}%  top-5 {dense_stats['acc5']:.2f}%")

    iters_per_epoch = len(train_loader)
    step_times: list[float] = []
    last_step_time = [time.perf_counter()]
    losses: list[float] = []  # since the last prune step

    def after_backward(grad_scale: float) -> None:
        if state["done"] or not uses_gradients:
            return
        saliency.collect(grad_scale)

    def make_after_step(epoch: int):
        def after_step(i: int, loss: float) -> bool:
            global_iter = epoch * iters_per_epoch + i
            losses.append(loss)
            if state["done"] or (global_iter + 1) % args.interval_prune:
                return False
            if uses_gradients and saliency.count == 0:
                print(f"prune step postponed at iteration {i + 1}: no batch with finite gradients")
                return False
            result = pruner.step(model_without_ddp)
            clear_pruned_state(optimizer, model_without_ddp, result.removed_units)
            widths = gates.widths()
            now = time.perf_counter()
            step_times.append(now - last_step_time[0])
            last_step_time[0] = now
            history.append({"step": pruner.steps, "epoch": epoch, "iteration": i + 1,
                            "ratio": result.ratio, "removed": result.removed, "dims": widths})
            drop = (1 - result.ratio) / pruner.steps
            eta = "?" if drop <= 0 else \
                f"{max(0.0, (result.ratio - args.latency_target) / drop) * sum(step_times) / len(step_times):.0f}s"
            imgs = args.interval_prune * args.batch_size * utils.get_world_size() / step_times[-1]
            print(f"prune step {pruner.steps}: {args.cost} ratio {result.ratio:.4f} (target "
                  f"{args.latency_target})  {width_summary(widths)}  loss "
                  f"{sum(losses) / len(losses):.4f}  img/s {imgs:.1f}  eta {eta}", flush=True)
            losses.clear()
            state["done"] = result.reached or result.stuck or result.budget_spent
            state["stuck"] = result.stuck
            if state["done"]:
                freeze(gates)
            next_epoch, next_iter = (epoch, i + 1) if i + 1 < iters_per_epoch else (epoch + 1, 0)
            save_state(next_epoch, next_iter)
            if is_main:
                write_history(output_dir, widths_of(original), history)
            return state["done"] and args.pruning_exit
        return after_step

    start_epoch = state["epoch"]
    stats = None
    for epoch in range(start_epoch, args.epochs):
        if state["done"] and args.pruning_exit:
            break
        skip = state["iteration"] if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip=skip * args.batch_size)
        scheduler.step(epoch)
        train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler, amp_dtype,
            args.clip_grad, args.clip_mode, None, mixup_fn, args.print_freq,
            after_backward=after_backward, after_step=make_after_step(epoch), start_iter=skip,
            seed_fn=lambda i, e=epoch: utils.seed_everything(utils.iteration_seed(args.seed, e, i, rank)))
        stats = None
        if args.student_eval:
            stats = evaluate(val_loader, model, device, amp_dtype, sharded)
            print(f"Epoch {epoch}: student top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  "
                  f"{args.cost} ratio {pruner.ratio():.4f}")
        if not (state["done"] and args.pruning_exit):
            save_state(epoch + 1, 0)

    if args.distributed:
        if not utils.replicas_identical_tensors(gates.tensors()):
            raise RuntimeError("processes ended with different masks: pruning lost synchronisation")
        print(f"all {utils.get_world_size()} processes hold identical masks after "
              f"{pruner.steps} prune steps")
    if stats is None:  # the last epoch's evaluation already scored the final masks
        stats = evaluate(val_loader, model, device, amp_dtype, sharded)
    ratio = pruner.ratio()
    extra = {"original_dims": original.to_dict(), "cost": args.cost, "cost_ratio": ratio,
             "top1_dense": top1_dense, "top1_pruned": stats["acc1"]}
    if is_main:
        save_pruned(model_without_ddp, output_dir, args, extra)
        if history:
            from tools.plot_widths import plot_widths
            plot_widths(widths_of(original), history[-1]["dims"], output_dir / "widths.png")
    dense_note = "" if top1_dense is None else f" (dense {top1_dense:.2f}%)"
    print(f"pruned model: {args.cost} ratio {ratio:.4f} of the original, top-1 {stats['acc1']:.2f}%"
          f"{dense_note}; dims {json.dumps(gates.widths())}")
    print(f"wrote {output_dir / PRUNED_FILE}")
    if ratio > args.latency_target:
        why = ("the minimum widths (one group of each kind per block) are reached"
               if state["stuck"] or min_ratio > args.latency_target else
               "the run ended first (more --epochs, a larger --prune_per_iter or --prune_dict budget)")
        raise UserError(f"--latency_target {args.latency_target} not reached: {args.cost} ratio "
                        f"{ratio:.4f}, {why}; the smallest model reached was saved")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())
