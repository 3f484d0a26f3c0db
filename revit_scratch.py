"""Train a per-block-dims DeiT (ReViT) from scratch, finetune a pruned one, or --eval a checkpoint.

    python revit_scratch.py --model deit_base_distilled_patch16_224 --EMB 176 --data-path DIR ...
    torchrun --nproc_per_node=8 revit_scratch.py ...          (same flags, one process per GPU)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import builders
import models
import utils
from engine import amp_dtype_for, evaluate, make_grad_scaler, train_one_epoch
from errors import UserError
from losses import BASE_LOSS_HEADS
from models import Dims, revit_dims

PRUNED_FILE = "pruned_checkpoint.pth"  # what nvit_prune.py writes, and --finetune FOLDER finds


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


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("ReViT training and evaluation", add_help=add_help)
    p.add_argument("--batch-size", default=64, type=int, help="per process")
    p.add_argument("--epochs", default=300, type=int)
    p.add_argument("--bce-loss", action="store_true")
    p.add_argument("--unscale-lr", action="store_true", help="do not scale --lr by total batch / 512")
    p.add_argument("--print-freq", default=50, type=int, help="progress line every N iterations")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="deit_base_distilled_patch16_224", type=str,
                   help="timm DeiT name: fixes patch, image size, depth and distillation")
    g.add_argument("--EMB", default=None, type=int, help="embedding width of the ReViT rule")
    g.add_argument("--dims", default=None, type=str, help="YAML/JSON dims spec (overrides --EMB)")
    g.add_argument("--patch-size", default=None, type=int, help="override the name's patch size")
    g.add_argument("--input-size", default=224, type=int)
    g.add_argument("--drop", default=0.0, type=float, help="dropout rate")
    g.add_argument("--attn-drop", default=0.0, type=float)
    g.add_argument("--drop-path", default=0.1, type=float)
    g.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights of --model (the full model of the KL term; "
                        "also the student's start when neither --EMB, --dims nor --scratch is given)")
    g.add_argument("--pretrained-path", default="", type=str,
                   help="local timm/DeiT or nvit checkpoint used where --pretrained would download")
    g.add_argument("--scratch", action="store_true",
                   help="random initial weights (with --finetune: keep its dims, drop its weights)")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    p.set_defaults(model_ema=True)
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true")

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=str)
    g.add_argument("--opt-eps", default=1e-8, type=float)
    g.add_argument("--opt-betas", default=None, type=float, nargs="+")
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", type=str, default="norm", choices=["norm", "value"])
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)

    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", type=str)
    g.add_argument("--lr", type=float, default=5e-4, help="for a total batch of 512")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--decay-epochs", type=float, default=30)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--cooldown-epochs", type=int, default=10)
    g.add_argument("--patience-epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = p.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="'none' disables")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", type=str, default="bicubic")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (timm)")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    p.set_defaults(repeated_aug=True)
    g.add_argument("--reprob", type=float, default=0.25)
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch", choices=["batch", "pair", "elem"])

    g = p.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", type=str)
    g.add_argument("--teacher-path", type=str, default="", help="file or URL of teacher weights")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"])
    g.add_argument("--distillation-alpha", default=0.5, type=float)
    g.add_argument("--distillation-tau", default=1.0, type=float,
                   help="temperature of the soft teacher loss, and of the full-model KL here")
    g.add_argument("--kl_loss_coeff", default=0.0, type=float,
                   help="weight of the KL divergence between the full pretrained --model and the "
                        "student (element-wise mean, class head against class head and "
                        "distillation head against distillation head, as the reference finetunes)")
    g.add_argument("--original_loss_coeff", default=1.0, type=float, help="weight of the DeiT loss")
    g.add_argument("--base-loss-head", default="mean", choices=BASE_LOSS_HEADS,
                   help="the label loss on the mean of the two heads (the NViT reference) or on "
                        "the class head (DeiT)")
    g.add_argument("--student_eval", "--student-eval", default=None, type=str2bool,
                   help="train the student in eval mode (no dropout or drop-path), as the reference "
                        "finetunes; default here: true with --finetune (nvit_prune.py: false, and "
                        "from the first prune step on)")

    g = p.add_argument_group("finetuning and checkpoints")
    g.add_argument("--finetune", default="",
                   help="start from this checkpoint (its dims are used), or a folder holding "
                        "pruned_checkpoint.pth")
    g.add_argument("--resume", nargs="?", const="auto", default="",
                   help="checkpoint to continue; bare --resume: OUTPUT_DIR/checkpoint.pth if any")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--eval", action="store_true", help="evaluate the checkpoint, train nothing")
    g.add_argument("--eval-crop-ratio", default=0.875, type=float)

    g = p.add_argument_group("data and run")
    g.add_argument("--data-path", default=None, type=str)
    g.add_argument("--data-set", default="IMNET", type=str.upper,
                   help="IMNET, FOLDER, CIFAR10, CIFAR100, INAT, INAT19, DIGITS")
    g.add_argument("--inat-category", default="name", type=str)
    g.add_argument("--output_dir", "--output-dir", default="", help="where to save, empty for no saving")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on the CPU")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--dist-eval", action="store_true", help="shard evaluation over processes")
    g.add_argument("--num_workers", "--num-workers", default=10, type=int)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    g.add_argument("--world_size", "--world-size", default=1, type=int)
    g.add_argument("--dist_url", "--dist-url", default="env://")
    g.add_argument("--local_rank", "--local-rank", default=0, type=int)
    return p


def requested_dims(args) -> Dims | None:
    if args.dims:
        return Dims.load(args.dims)
    if args.EMB is not None:
        return dims_for_emb(args.EMB)
    return None


def resume_path(args) -> str | None:
    """--resume FILE, or with bare --resume the output dir's checkpoint if there is one."""
    if not args.resume:
        return None
    if args.resume == "auto":
        if not args.output_dir:
            raise UserError("bare --resume needs --output_dir (or give the checkpoint path)")
        path = Path(args.output_dir) / "checkpoint.pth"
        if not path.is_file():
            print(f"--resume: no {path} yet, starting from the beginning")
            return None
        return str(path)
    if not args.resume.startswith(("http://", "https://")) and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume} does not exist")
    return args.resume


def create_student(args, nb_classes: int, resume: str | None) -> torch.nn.Module:
    """Which weights and dims the student starts from: resume > finetune > pretrained > random."""
    frame = dict(img_size=args.input_size, num_classes=nb_classes,
                 drop_rate=args.drop, attn_drop_rate=args.attn_drop, drop_path_rate=args.drop_path)
    if args.patch_size:
        frame["patch_size"] = args.patch_size
    dims = requested_dims(args)
    source = resume or args.finetune or None
    if source:
        model = models.build_model(args.model, dims=dims, checkpoint=source,
                                   adapt=bool(args.finetune) and not resume and not args.eval, **frame)
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
    if not folder.is_dir():
        return
    args.finetune = str(folder / PRUNED_FILE)
    if not Path(args.finetune).is_file():
        raise UserError(f"--finetune {folder} is a folder without {PRUNED_FILE}")
    if not args.output_dir and not args.eval:
        kind = "scratch" if args.scratch else "ft_dense"
        name = (f"{kind}_{args.epochs}_lr_{args.lr}_a_{args.distillation_alpha}"
                f"_T_{args.distillation_tau}" + ("_CNN_only" if args.kl_loss_coeff == 0 else ""))
        args.output_dir = str(folder / name)
        print(f"--finetune {folder}: writing to {args.output_dir}")


def check_args(args) -> None:
    if args.eval and not (args.resume or args.finetune):
        raise UserError("--eval needs a checkpoint: --resume CKPT or --finetune CKPT")
    if args.finetune and not args.finetune.startswith(("http://", "https://")) \
            and not Path(args.finetune).exists():
        raise UserError(f"--finetune {args.finetune} does not exist")
    if args.epochs <= 0 and not args.eval:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")


def checkpoint_dict(model, optimizer, scheduler, scaler, model_ema, epoch, args, max_accuracy):
    return {
        "model": model.state_dict(),
        "dims": model.dims.to_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "max_accuracy": max_accuracy,
        "args": utils.plain(vars(args)),
    }


def main(args) -> None:
    check_args(args)
    utils.init_distributed_mode(args)
    if args.finetune:
        finetune_folder_defaults(args)
    device = utils.resolve_device(args.device)
    sharded = args.distributed and args.dist_eval  # eval shards summed over ranks
    rank = utils.get_rank()
    utils.seed_everything(args.seed + rank)
    output_dir = utils.prepare_output_dir(args.output_dir)  # every rank checks it is writable
    if not utils.is_main_process():
        output_dir = None

    train_loader, val_loader, nb_classes, train_sampler = builders.build_loaders(
        args, need_train=not args.eval)
    resume = resume_path(args)
    if args.eval and args.resume and not resume:
        raise UserError(f"--eval --resume: there is no checkpoint in {args.output_dir} to evaluate")
    model = create_student(args, nb_classes, resume).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, dims {json.dumps(model.dims.to_dict())}")
    amp_dtype = amp_dtype_for(device, args.amp)

    if args.eval:
        stats = evaluate(val_loader, model, device, amp_dtype, sharded)
        print(f"Accuracy of the network on the {stats['n']} test images: "
              f"top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f}")
        return

    model_without_ddp = model
    if args.distributed:  # DDP broadcasts rank 0's weights, so the EMA is made after it
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model_ema = builders.init_model_ema(args, model_without_ddp)
    optimizer = builders.build_optimizer(args, model_without_ddp)
    scheduler = builders.build_scheduler(args, optimizer)
    scaler = make_grad_scaler(device, amp_dtype)
    mixup_fn = builders.build_mixup(args, nb_classes)
    criterion = builders.build_criterion(args, nb_classes, mixup_fn, device,
                                         kl_tau=args.distillation_tau, per_head=True)
    student_eval = bool(args.finetune) if args.student_eval is None else args.student_eval
    model_without_ddp.return_pair = student_eval  # both heads for the losses in eval mode
    max_accuracy = 0.0
    if resume:
        ckpt = models.read_checkpoint(resume)
        missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if k not in ckpt]
        if missing:
            raise UserError(f"--resume {resume} is not a training checkpoint (no {missing[0]}); "
                            f"use --finetune to start from its weights")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if model_ema is not None and ckpt.get("model_ema"):
            model_ema.module.load_state_dict(ckpt["model_ema"])
        args.start_epoch = ckpt["epoch"] + 1
        max_accuracy = ckpt.get("max_accuracy", 0.0)
        print(f"resumed from {resume} at epoch {args.start_epoch}")
    elif output_dir is not None:
        utils.refuse_to_overwrite(output_dir, ("checkpoint.pth", "best_checkpoint.pth", "log.txt"))

    writer = None
    if output_dir is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=str(output_dir / "tb"))
        except ImportError:
            pass

    print(f"training for {args.epochs} epochs from epoch {args.start_epoch}; "
          f"lr {builders.scaled_lr(args):.3g} for a total batch of "
          f"{args.batch_size * utils.get_world_size()}; student in "
          f"{'eval' if student_eval else 'train'} mode")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        scheduler.step(epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler, amp_dtype,
            args.clip_grad, args.clip_mode, model_ema, mixup_fn, args.print_freq,
            seed_fn=lambda i, e=epoch: utils.seed_everything(utils.iteration_seed(args.seed, e, i, rank)),
            train_mode=not student_eval)
        test_stats = evaluate(val_loader, model, device, amp_dtype, sharded)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        line = (f"Epoch {epoch}: top-1 {test_stats['acc1']:.2f}%  top-5 {test_stats['acc5']:.2f}%"
                f"  (best top-1 {max_accuracy:.2f}%)  train loss {train_stats['loss']:.4f}")
        log = {"epoch": epoch, "n_parameters": n_params,
               **{f"train_{k}": v for k, v in train_stats.items()},
               **{f"test_{k}": v for k, v in test_stats.items()}}
        if model_ema is not None:
            ema_device = next(model_ema.module.parameters()).device  # --model-ema-force-cpu
            ema_stats = evaluate(val_loader, model_ema.module, ema_device, amp_dtype, sharded)
            line += f"  EMA top-1 {ema_stats['acc1']:.2f}%"
            log.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        print(line, flush=True)
        if output_dir is not None:
            ckpt = checkpoint_dict(model_without_ddp, optimizer, scheduler, scaler, model_ema,
                                   epoch, args, max_accuracy)
            utils.save_atomic(ckpt, output_dir / "checkpoint.pth")
            if improved:
                utils.copy_atomic(output_dir / "checkpoint.pth", output_dir / "best_checkpoint.pth")
            utils.append_json_line(output_dir / "log.txt", log)
            if writer is not None:
                for k, v in log.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, epoch)
                writer.flush()
    if args.distributed:
        if not utils.replicas_identical(model_without_ddp):
            raise RuntimeError("processes ended with different weights: DDP lost synchronisation")
        print(f"all {utils.get_world_size()} processes hold identical weights")
    print(f"training time {time.time() - start:.0f}s; best top-1 {max_accuracy:.2f}%")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())
