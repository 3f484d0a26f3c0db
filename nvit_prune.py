"""Prune a pretrained DeiT toward a latency (or MACs/params) target and write a compact model.

    python nvit_prune.py --model deit_base_distilled_patch16_224 --pretrained --pruning \
        --pruning_config configs/nvit_reference.json --latency_look_up_table TABLE.json \
        --latency_target 0.54 --data-path DIR --output_dir OUT ...
    torchrun --nproc_per_node=8 nvit_prune.py ...            (same flags, one process per GPU)

The flags mean what they meant in the NViT reference's main_full_global_latency.py. The
weights train on original_loss_coeff * DeiT loss, plus, from the first prune step on,
kl_loss_coeff * KL(student || frozen full model) at --kl-tau; with --student_eval the
student trains in eval mode from that step, and the saliency EMA restarts there. The
learning rate stays at its first value. Every --interval_prune iterations a prune step
removes --prune_per_iter // --group_size more groups of any kind; the run ends when the
cost reaches --latency_target (0: no target), the --prune_dict budget is spent, or nothing
is left to remove. Outputs in --output_dir: pruned_checkpoint.pth (the compact model,
loadable by revit_scratch.py --finetune/--eval), pruning_state.pth (for --resume),
dims_history.json and widths.png.
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
from pruning import Gates, Saliency, compact
from pruning.config import PruningConfig, parse_config
from pruning.cost import build_cost_model
from pruning.gates import EMB_SALIENCY
from pruning.units import clear_pruned_state
from pruning.pruner import DEFAULT_PACE, GlobalPruner
from revit_scratch import get_args_parser as training_args_parser
from revit_scratch import str2bool

STATE_FILE = "pruning_state.pth"
PRUNED_FILE = "pruned_checkpoint.pth"
QKV_UNIT_FLAGS = {"shared": "shared", "per-head": "per_head"}


def get_args_parser():
    p = training_args_parser(add_help=False)
    import argparse
    parser = argparse.ArgumentParser("NViT global structural pruning", parents=[p])
    parser.set_defaults(kl_loss_coeff=1000.0, student_eval=False)  # the reference's defaults
    g = parser.add_argument_group("pruning")
    g.add_argument("--pruning", action="store_true", help="prune (the reference's switch)")
    g.add_argument("--pruning_config", "--pruning-config", default="",
                   help="JSON: nvit's format (criterion, group_sizes, scales, momentum; "
                        "configs/nvit_reference.json) or an NViT reference config "
                        "(pruning_configs/group8_m23_m09.json)")
    g.add_argument("--prune_per_iter", "--prune-per-iter", default=1024, type=int,
                   help="each prune step removes prune_per_iter // group_size more groups")
    g.add_argument("--group_size", "--group-size", default=DEFAULT_PACE, type=int,
                   help="the divisor of --prune_per_iter and --prune_dict (the reference's; the "
                        "groups themselves are 16 channels, 2 heads, 8 QK, 8 V, 16 neurons)")
    g.add_argument("--interval_prune", "--interval-prune", default=100, type=int,
                   help="prune after iterations interval+1, 2*interval+1, ... (as the reference)")
    g.add_argument("--prune_dict", "--prune-dict", default='{"Global": 39000}',
                   help='JSON {"Global": N}: at most N // group_size groups removed, in at most '
                        'N // prune_per_iter + 1 prune steps')
    g.add_argument("--cost", default="latency", choices=["latency", "macs", "params"])
    g.add_argument("--latency_target", "--latency-target", default=0.0, type=float,
                   help="stop when cost <= target * cost of the original model (0: no target, "
                        "prune until the --prune_dict budget is spent)")
    g.add_argument("--latency_regularization", "--latency-regularization", default=0.0,
                   type=float, help="lambda in score - lambda * cost drop (the paper: 5e-4)")
    g.add_argument("--latency_look_up_table", "--latency-look-up-table", default="",
                   help="JSON table from tools/build_latency_table.py (or the reference format)")
    g.add_argument("--pruning_exit", "--pruning-exit", action="store_true",
                   help="accepted for the reference's commands: the run always ends when pruning does")
    g.add_argument("--kl-tau", "--kl_tau", default=3.0, type=float,
                   help="temperature of the KL term while pruning (the reference's fixed 3)")
    g.add_argument("--qk-v-units", default="shared", choices=sorted(QKV_UNIT_FLAGS),
                   help="a QK/V unit is one index shared by every head of a block (the reference) "
                        "or one (head, index) pair")
    g.add_argument("--emb-saliency", default="full", choices=EMB_SALIENCY,
                   help="an embedding channel's score sums every weight it removes (full) or, as the "
                        "reference, leaves out tokens, position embedding and classifier columns")
    g.add_argument("--pruning-lr", default="constant", choices=["constant", "schedule"],
                   help="constant: the schedule's first learning rate throughout (the reference); "
                        "schedule: follow --sched/--warmup-epochs per epoch")
    g.add_argument("--token_scale", "--token-scale", default=True, type=str2bool,
                   help="give the student the reference's learnable token scale on q, k, v "
                        "(initialised to 1) if it has none")
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


def pruning_config(args) -> PruningConfig:
    if not args.pruning_config:
        return PruningConfig()
    try:
        config = parse_config(read_json_file(args.pruning_config, "--pruning_config"))
    except ValueError as e:
        raise UserError(f"--pruning_config {args.pruning_config}: {e}") from None
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
    if not 0.0 <= args.latency_target < 1.0:
        raise UserError(f"--latency_target must be in [0, 1) (a fraction of the original cost, "
                        f"0 for none), got {args.latency_target}")
    for flag, value in (("--prune_per_iter", args.prune_per_iter),
                        ("--interval_prune", args.interval_prune),
                        ("--group_size", args.group_size), ("--kl-tau", args.kl_tau)):
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
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
                 attn_drop_rate=args.attn_drop, drop_path_rate=args.drop_path,
                 token_scale=args.token_scale)
    if args.patch_size:
        frame["patch_size"] = args.patch_size
    if args.pretrained_path:
        return models.build_model(args.model, checkpoint=args.pretrained_path, **frame)
    return models.build_model(args.model, pretrained=True, **frame)


def run_settings(args, config: PruningConfig) -> dict:
    """What a resumed run must share with the original for its replay to be exact."""
    keys = ("batch_size", "interval_prune", "prune_per_iter", "group_size", "prune_dict", "cost",
            "latency_target", "latency_regularization", "seed", "data_set", "input_size",
            "kl_loss_coeff", "original_loss_coeff", "kl_tau", "qk_v_units", "emb_saliency",
            "pruning_lr", "student_eval", "token_scale", "base_loss_head")
    return {"config": config.as_dict(), "world_size": utils.get_world_size(),
            **{k: getattr(args, k) for k in keys}}


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
    if config.ignored:
        print(f"--pruning_config {args.pruning_config}: keys without effect, as in the reference "
              f"(set by flags here, or unused): {', '.join(config.ignored)}")

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

    gates = Gates.attach(model, qkv_units=QKV_UNIT_FLAGS[args.qk_v_units],
                         emb_saliency=args.emb_saliency)
    saliency = Saliency(gates, config.criterion, config.scales, config.momentum, args.seed)
    uses_gradients = saliency.criterion.needs_gradients
    if not uses_gradients:
        freeze(gates)
    try:
        pruner = GlobalPruner(gates, saliency, cost, args.latency_target, args.prune_per_iter,
                              config.group_sizes, args.latency_regularization, budget,
                              pace=args.group_size)
    except ValueError as e:
        raise UserError(f"--pruning_config: {e}") from None
    min_ratio = pruner.minimum_ratio()
    if min_ratio > args.latency_target > 0:
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
    criterion = builders.build_criterion(args, nb_classes, mixup_fn, device, kl_tau=args.kl_tau,
                                         per_head=False, full_model=full_model)

    def set_phase() -> None:
        """Before the first prune step: DeiT loss only, train mode. From it on: the KL term,
        and with --student_eval the student in eval mode (both heads still returned)."""
        pruning = pruner.steps > 0
        criterion.kl_enabled = pruning
        model_without_ddp.return_pair = pruning and args.student_eval
        model.train(not model_without_ddp.return_pair)

    settings = run_settings(args, config)
    history: list[dict] = []
    state = {"epoch": 0, "iteration": 0, "done": False, "stuck": False}
    if resume:
        ckpt = models.read_checkpoint(resume)
        if "pruner" not in ckpt:
            raise UserError(f"--resume {resume} is not a pruning state file ({STATE_FILE})")
        if ckpt["original_dims"] != original.to_dict():
            raise UserError(f"--resume {resume} belongs to a run on another model")
        changed = [k for k, v in utils.plain(settings).items() if ckpt["settings"].get(k) != v]
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
        state.update({k: ckpt[k] for k in state})
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
            **state, "epoch": epoch, "iteration": iteration, "history": history,
            "settings": utils.plain(settings),
            "original_dims": original.to_dict(), "args": utils.plain(vars(args)),
        }, output_dir / STATE_FILE)

    top1_dense = None
    if not resume:
        dense_stats = evaluate(val_loader, model, device, amp_dtype, sharded)
        top1_dense = dense_stats["acc1"]
        print(f"before pruning: top-1 {dense_stats['acc1']:.2f}%  top-5 {dense_stats['acc5']:.2f}%")

    iters_per_epoch = len(train_loader)
    step_times: list[float] = []
    last_step_time = [time.perf_counter()]
    losses: dict[str, list[float]] = {}  # loss and its parts since the last step

    def after_backward(grad_scale: float) -> None:
        if state["done"] or not uses_gradients:
            return
        saliency.collect(grad_scale)

    def make_after_step(epoch: int):
        def after_step(i: int, values: dict[str, float]) -> bool:
            global_iter = epoch * iters_per_epoch + i
            for k, v in values.items():
                losses.setdefault(k, []).append(v)
            # the reference prunes in the iteration after every interval_prune-th one
            if state["done"] or global_iter == 0 or global_iter % args.interval_prune:
                return False
            if uses_gradients and saliency.count == 0:
                print(f"prune step postponed at iteration {i + 1}: no batch with finite gradients")
                return False
            result = pruner.step(model_without_ddp)
            clear_pruned_state(optimizer, model_without_ddp, result.removed_units)
            if pruner.steps == 1:  # the loss changes here: the reference restarts its EMA
                saliency.reset_ema()
                set_phase()
            widths = gates.widths()
            now = time.perf_counter()
            step_times.append(now - last_step_time[0])
            last_step_time[0] = now
            means = {k: sum(v) / len(v) for k, v in losses.items() if v}
            history.append({"step": pruner.steps, "epoch": epoch, "iteration": i + 1,
                            "ratio": result.ratio, "removed_groups": result.removed,
                            "dims": widths, **means})
            drop = (1 - result.ratio) / pruner.steps
            target = args.latency_target
            eta = "?" if drop <= 0 or target == 0 else \
                f"{max(0.0, (result.ratio - target) / drop) * sum(step_times) / len(step_times):.0f}s"
            imgs = args.interval_prune * args.batch_size * utils.get_world_size() / step_times[-1]
            removed = ", ".join(f"{k} {n}" for k, n in result.removed.items() if n) or "none"
            print(f"prune step {pruner.steps}: {args.cost} ratio {result.ratio:.4f} (target "
                  f"{target})  removed groups: {removed}  {width_summary(widths)}  loss "
                  f"{means['loss']:.4f} (kl {means.get('loss_kl', 0.0):.4g}, deit "
                  f"{means.get('loss_deit', 0.0):.4g})  img/s {imgs:.1f}  eta {eta}", flush=True)
            for v in losses.values():
                v.clear()
            state["done"] = result.reached or result.stuck or result.budget_spent
            state["stuck"] = result.stuck
            if state["done"]:
                freeze(gates)
            next_epoch, next_iter = (epoch, i + 1) if i + 1 < iters_per_epoch else (epoch + 1, 0)
            save_state(next_epoch, next_iter)
            if is_main:
                write_history(output_dir, widths_of(original), history)
            return state["done"]
        return after_step

    start_epoch = state["epoch"]
    stats = None
    for epoch in range(start_epoch, args.epochs):
        if state["done"]:
            break
        skip = state["iteration"] if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip=skip * args.batch_size)
        scheduler.step(0 if args.pruning_lr == "constant" else epoch)
        set_phase()
        train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler, amp_dtype,
            args.clip_grad, args.clip_mode, None, mixup_fn, args.print_freq,
            after_backward=after_backward, after_step=make_after_step(epoch), start_iter=skip,
            seed_fn=lambda i, e=epoch: utils.seed_everything(utils.iteration_seed(args.seed, e, i, rank)),
            train_mode=not model_without_ddp.return_pair)
        stats = evaluate(val_loader, model, device, amp_dtype, sharded)
        print(f"Epoch {epoch}: student top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  "
              f"{args.cost} ratio {pruner.ratio():.4f}")
        if not state["done"]:
            save_state(epoch + 1, 0)

    if args.distributed:
        if not utils.replicas_identical_tensors(gates.tensors()):
            raise RuntimeError("processes ended with different masks: pruning lost synchronisation")
        print(f"all {utils.get_world_size()} processes hold identical masks after "
              f"{pruner.steps} prune steps")
    if stats is None:  # resumed after the end: score the final masks
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
    if ratio > args.latency_target > 0:
        if state["stuck"]:
            why = "the minimum widths (one group of each kind per block) are reached"
        elif pruner.budget_spent:
            why = (f"the --prune_dict budget of {pruner.max_steps} prune steps "
                   f"(N // prune_per_iter + 1) is spent")
        elif min_ratio > args.latency_target:
            why = f"the minimum widths give {min_ratio:.3f}"
        else:
            why = "the run ended first (more --epochs, or a larger --prune_per_iter)"
        raise UserError(f"--latency_target {args.latency_target} not reached: {args.cost} ratio "
                        f"{ratio:.4f}, {why}; the smallest model reached was saved")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())
