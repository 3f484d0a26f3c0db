"""Train a per-block-dims DeiT (ReViT) from scratch, finetune a pruned one, or --eval a checkpoint.

    python revit_scratch.py --model deit_base_distilled_patch16_224 --EMB 176 --data-path DIR ...
    torchrun --nproc_per_node=8 revit_scratch.py ...          (same flags, one process per GPU)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import builders
import checkpoints
import flags
import models
import utils
from datasets import skipped_images
from engine import (amp_dtype_for, evaluate, evaluate_features, headline, make_grad_scaler,
                    score_text, train_one_epoch)
from errors import UserError
from models import Dims, SwinDims, revit_dims
from models.checkpoint import is_hub_folder


# ================================== EDIT HERE ==================================
# The per-block dims trained with --EMB. As shipped this is the NViT paper's ReViT rule
# (heads [10, 2k, 2k, 4k x6, 2k, 2k, 10], QK per head [16q, 8q, 8q, 16q x6, 8q, 8q, 16q],
# V per head 64, MLP [3E x3, 6E x6, 3E x3]) in the reference's model (attention scale
# 64^-0.5, token scale, PyTorch's default init). To train another shape, return your own
# lists, one entry per block, e.g.
#     return Dims(embed_dim=EMB, num_heads=[4] * 12, qk_dim=[32] * 12, v_dim=[64] * 12,
#                 mlp_dim=[4 * EMB] * 12, attn_scale=[64 ** -0.5] * 12, token_scale=True,
#                 init="torch_default")   # drop the last three for a timm-style ViT
# `--dims FILE` (YAML or JSON with the same fields) overrides this without editing.
def dims_for_emb(EMB: int) -> Dims:
    return revit_dims(EMB)
# ===============================================================================


def get_args_parser() -> flags.Parser:
    p = flags.Parser("ReViT training, finetuning and evaluation", config=True)
    flags.add_run_args(p)
    flags.add_model_args(p, widths=True)
    flags.add_ema_args(p)
    flags.add_optimizer_args(p)
    flags.add_data_args(p)
    flags.add_loss_args(p, kl_loss_coeff=0.0, student_eval_help=(
        "train the student in eval mode (no dropout or drop-path), as the reference finetunes; "
        "default: true with --finetune, false otherwise"))
    flags.add_checkpoint_args(p, finetune=True, resume_help=(
        "checkpoint (file or URL) to continue; bare --resume: OUTPUT_DIR/checkpoint.pth if any"))
    return p


def requested_dims(args) -> Dims | SwinDims | None:
    if args.dims:
        return models.load_dims(args.dims)
    if args.EMB is not None:
        return dims_for_emb(args.EMB)
    return None


def student_source(args, resume: str | None) -> str | None:
    """The checkpoint the student's weights (and dims) come from, if any."""
    if resume or args.finetune:
        return resume or args.finetune
    if args.pretrained_path and not args.scratch and not (args.dims or args.EMB):
        return args.pretrained_path
    return None


def create_student(args, dims: Dims | SwinDims | None, nb_classes: int, resume: str | None) -> torch.nn.Module:
    """Which weights and dims the student starts from: resume > finetune > pretrained > random."""
    frame = builders.model_kwargs(args, nb_classes)
    source = resume or args.finetune or None
    if source:
        model = models.build_model(args.model, dims=dims, checkpoint=source,
                                   adapt=bool(args.finetune) and not resume and not args.eval,
                                   ema=args.use_ema and (args.eval or not resume), **frame)
        if args.scratch and not resume:
            model.reset_parameters()
        return model
    if (args.pretrained or args.pretrained_path) and not args.scratch and dims is None:
        if args.pretrained_path:
            return models.build_model(args.model, checkpoint=args.pretrained_path, adapt=True, **frame)
        return models.build_model(args.model, pretrained=True, adapt=True, **frame)
    return models.build_model(args.model, dims=dims, **frame)


def finetune_folder_defaults(args) -> None:
    """--finetune FOLDER as the reference's finetune_dense.py: start from the folder's
    pruned_checkpoint.pth, and without --output_dir write next to it, in the subfolder the
    reference named after the run."""
    folder = Path(args.finetune)
    if not folder.is_dir() or is_hub_folder(folder):  # a hub folder is a checkpoint itself
        return
    args.finetune = str(folder / checkpoints.PRUNED_FILE)
    if not Path(args.finetune).is_file():
        raise UserError(f"--finetune {folder} is a folder without {checkpoints.PRUNED_FILE}")
    if not args.output_dir and not args.eval:
        kind = "scratch" if args.scratch else "ft_dense"
        name = (f"{kind}_{args.epochs}_lr_{args.lr}_a_{args.distillation_alpha}"
                f"_T_{args.distillation_tau}" + ("_CNN_only" if args.kl_loss_coeff == 0 else ""))
        args.output_dir = str(folder / name)
        print(f"--finetune {folder}: writing to {args.output_dir}")


def feature_channels(args) -> list[int] | None:
    """The full model's output channels a compact --finetune model holds (recorded by
    nvit_prune.py; None: all of them)."""
    if not args.finetune:
        return None
    return models.read_checkpoint(args.finetune).get("feature_channels")


def best_text(name: str, value: float) -> str:
    return f"{name} {value:.2f}%" if name == "top-1" else f"{name} {value:.4f}"


def check_args(args) -> None:
    if args.eval and not (args.resume or args.finetune):
        raise UserError("--eval needs a checkpoint: --resume CKPT or --finetune CKPT")
    if args.finetune and not checkpoints.is_url(args.finetune) and not Path(args.finetune).exists():
        raise UserError(f"--finetune {args.finetune} does not exist")
    if args.epochs <= 0 and not args.eval:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if args.dims and args.EMB is not None:
        raise UserError("--dims and --EMB both choose the dims; give one of them")
    if args.use_ema and not (args.eval or args.finetune):
        raise UserError("--use-ema takes a checkpoint's EMA weights for --eval or --finetune; "
                        "a resumed run keeps both")
    if args.best_on_ema and not args.model_ema:
        raise UserError("--best-on-ema needs the weight EMA (drop --no-model-ema)")
    builders.check_loss_args(args)
    utils.require_wandb(args)


def main(args) -> None:
    check_args(args)
    run = utils.setup_run(args, after_init=finetune_folder_defaults if args.finetune else None,
                          writes=not args.eval)
    device = run.device
    output_dir = run.output_dir if run.is_main else None
    resume = checkpoints.resume_path(args.resume, args.output_dir, checkpoints.CHECKPOINT_FILE)
    if args.eval and args.resume and not resume:
        raise UserError(f"--eval --resume: there is no checkpoint in {args.output_dir} to evaluate")
    dims = requested_dims(args)
    builders.resolve_input_size(args, dims, student_source(args, resume))

    train_loader, val_loader, nb_classes, train_sampler = builders.build_loaders(
        args, need_train=not args.eval)
    builders.check_dims_frame(dims, args.dims, nb_classes)
    model = builders.for_objective(
        args, create_student(args, dims, builders.model_classes(args, nb_classes), resume)
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, dims {json.dumps(model.dims.to_dict())}")
    amp_dtype = amp_dtype_for(device, args.amp, args.amp_dtype)

    mixup_fn = builders.build_mixup(args, nb_classes)

    def make_criterion() -> torch.nn.Module:
        return builders.build_criterion(args, nb_classes, mixup_fn, device,
                                        kl_tau=args.distillation_tau, per_head=True,
                                        student=model, channels=feature_channels(args))

    # a label-free run is scored against its full model, --eval included; any other run
    # builds its losses (and fetches a teacher) only to train
    criterion = make_criterion() if builders.label_free(args) else None

    def score(m: torch.nn.Module, on: torch.device) -> dict:
        if builders.label_free(args):
            return evaluate_features(val_loader, m, criterion, on, amp_dtype, run.sharded_eval)
        return evaluate(val_loader, m, on, amp_dtype, run.sharded_eval)

    if args.eval:
        stats = score(builders.compile_model(args, model), device)
        what = "Accuracy" if "acc1" in stats else "Score"  # DeiT's line, for scripts reading it
        print(f"{what} of the network on the {stats['n']} test images: {score_text(stats)}"
              + (f"  loss {stats['loss']:.4f}" if "acc1" in stats else ""))
        return

    if criterion is None:
        criterion = make_criterion()
    model_without_ddp = model
    # DDP broadcasts rank 0's weights, so the EMA is made after it
    model = builders.distributed_model(args, model, device)
    model = builders.compile_model(args, model)
    model_ema = builders.init_model_ema(args, model_without_ddp)
    optimizer = builders.build_optimizer(args, model_without_ddp)
    scheduler = builders.build_scheduler(args, optimizer)
    scaler = make_grad_scaler(device, amp_dtype)
    student_eval = bool(args.finetune) if args.student_eval is None else args.student_eval
    model_without_ddp.return_pair = student_eval  # both heads for the losses in eval mode
    # the best score so far: top-1, or label-free the feature cosine (which may be negative)
    max_accuracy = -1.0 if builders.label_free(args) else 0.0
    best_epoch, history, run_id = None, [], checkpoints.new_run_id()
    ckpt = None
    if resume:
        ckpt = models.read_checkpoint(resume)
        checkpoints.restore_training_state(ckpt, resume, optimizer, scheduler, scaler)
        if model_ema is not None and ckpt.get("model_ema"):
            model_ema.module.load_state_dict(ckpt["model_ema"])
        args.start_epoch = ckpt["epoch"] + 1
        if bool((ckpt.get("args") or {}).get("best_on_ema")) != args.best_on_ema:
            raise UserError(f"--resume {resume}: that run chose its best checkpoint "
                            f"{'without' if args.best_on_ema else 'with'} --best-on-ema; resume "
                            f"it the same way")
        max_accuracy = ckpt.get("max_accuracy", 0.0)
        best_epoch = ckpt.get("best_epoch")
        run_id = ckpt.get("run_id") or run_id
        print(f"resumed from {resume} at epoch {args.start_epoch}")

    # every input has passed: from here on the folder is ours
    utils.claim_output_dir(run, check=lambda: checkpoints.check_run_files(
        resume, run.output_dir, checkpoints.CHECKPOINT_FILE, checkpoints.TRAINING_RUN_FILES),
        args=args)
    if ckpt is not None:
        history = checkpoints.restore_epoch_records(ckpt, resume, output_dir)
        del ckpt
    scalars = utils.scalar_log(output_dir, args)

    print(f"training for {args.epochs} epochs from epoch {args.start_epoch}; "
          f"lr {builders.scaled_lr(args):.3g} for a total batch of "
          f"{builders.total_batch(args)}; student in "
          f"{'eval' if student_eval else 'train'} mode")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        scheduler.step(epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler, amp_dtype,
            args.clip_grad, args.clip_mode, model_ema, mixup_fn, args.print_freq,
            seed_fn=utils.seed_fn(args.seed, epoch, run.rank), train_mode=not student_eval,
            accum_steps=args.grad_accum_steps)
        test_stats = score(model, device)
        log = {"epoch": epoch, "n_parameters": n_params,
               **{f"train_{k}": v for k, v in train_stats.items()},
               **{f"test_{k}": v for k, v in test_stats.items()}}
        ema_note = ""
        if model_ema is not None:
            ema_device = next(model_ema.module.parameters()).device  # --model-ema-force-cpu
            ema_stats = score(model_ema.module, ema_device)
            ema_note = f"  EMA {score_text(ema_stats)}"
            log.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        name, value = headline(ema_stats if args.best_on_ema else test_stats)
        improved = value > max_accuracy
        if improved:
            max_accuracy, best_epoch = value, epoch
        print(f"Epoch {epoch}: {score_text(test_stats)}  (best {'EMA ' if args.best_on_ema else ''}"
              f"{best_text(name, max_accuracy)})  train loss {train_stats['loss']:.4f}{ema_note}",
              flush=True)
        if args.skip_bad_images:
            log["skipped_images"] = skipped_images()
        history.append(log)
        if output_dir is not None:
            checkpoints.write_epoch_records(
                output_dir, lambda path: checkpoints.save_training_checkpoint(
                    path, model_without_ddp, optimizer, scheduler, scaler, model_ema, epoch, args,
                    max_accuracy, best_epoch, history, run_id),
                epoch, improved, history)
            scalars.add(log, epoch, axis="epoch")
    scalars.close()
    if args.distributed:
        if not utils.replicas_identical(model_without_ddp):
            raise RuntimeError("processes ended with different weights: DDP lost synchronisation")
        print(f"all {run.world_size} processes hold identical weights")
    best = "feature cosine" if builders.label_free(args) else "top-1"
    print(f"training time {time.time() - start:.0f}s; best {'EMA ' if args.best_on_ema else ''}"
          f"{best_text(best, max_accuracy)}")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())
