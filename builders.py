"""Turn parsed flags into the pieces of a run: loaders, teacher, full model, criterion, optimizer.

Shared by revit_scratch.py and nvit_prune.py so both scripts read the same flags the same way.
"""
from __future__ import annotations

import copy
import os

import timm
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

import models
import utils
from datasets import LABEL_FREE_SETS, build_dataset
from errors import UserError
from losses import DistillationLoss, FeatureDistillLoss, FullModelKLLoss
from models.hub import download_problem
from samplers import RASampler, SeededDataset, SeededSampler, ShardSampler


def model_kwargs(args, nb_classes: int | None = None) -> dict:
    """build_model's keyword arguments from the flags: the frame (input size, classes,
    patch), the drop rates and timm's model kwargs (--gp, --model-kwargs)."""
    kw = dict(img_size=args.input_size, drop_rate=args.drop, attn_drop_rate=args.attn_drop,
              drop_path_rate=args.drop_path, **timm_kwargs(args))
    if nb_classes is not None:
        kw["num_classes"] = nb_classes
    if args.patch_size:
        kw["patch_size"] = args.patch_size
    return kw


def timm_kwargs(args) -> dict:
    """timm's model kwargs the flags give (--model-kwargs, and --gp as global_pool)."""
    kw = dict(getattr(args, "model_kwargs", None) or {})
    if getattr(args, "gp", None):
        kw["global_pool"] = args.gp
    return kw


def resolve_input_size(args, dims=None, checkpoint: str | None = None) -> None:
    """--input-size unset: the size the model is built at (checkpoint's, dims file's or the
    name's), so the data are never cut for one size while the model has another."""
    planned = models.planned_img_size(args.model, dims, checkpoint, **timm_kwargs(args))
    if args.input_size is None:
        args.input_size = planned
    elif args.input_size != planned and dims is not None and dims.img_size is not None:
        print(f"--input-size {args.input_size} replaces the dims file's img_size {dims.img_size}")


def check_dims_frame(dims, dims_file: str | None, nb_classes: int) -> None:
    """A dims file's frame fields must agree with the data they will be trained on."""
    if dims is None or not dims_file:
        return
    if dims.num_classes is not None and dims.num_classes != nb_classes:
        raise UserError(f"--dims {dims_file} says num_classes {dims.num_classes}, but the data set "
                        f"has {nb_classes} classes; remove num_classes or fix it")
    if dims.in_chans not in (None, 3):
        raise UserError(f"--dims {dims_file} says in_chans {dims.in_chans}, but the data loaders "
                        f"give RGB images (3 channels)")


def label_free(args) -> bool:
    """--distill-target features: the student matches the full model's output features; no
    label, no classifier."""
    return getattr(args, "distill_target", "logits") == "features"  # benchmarks' namespaces


def model_classes(args, nb_classes: int) -> int | None:
    """The classes to build a model with: the data set's; in a label-free run None, the
    checkpoint's or the name's (the model then becomes a backbone: `for_objective`)."""
    return None if label_free(args) else nb_classes


def for_objective(args, model: torch.nn.Module) -> torch.nn.Module:
    """The model as the run's objective uses it: label-free, a backbone (its classifier
    dropped, timm's reset_classifier(0)) whose forward gives its feature pair."""
    if label_free(args):
        if model.num_classes:
            model.reset_classifier(0)
        model.return_features = True
    return model


def check_loss_args(args) -> None:
    """Flag combinations where a given flag would be silently ignored, or cannot work."""
    if label_free(args):
        if args.kl_loss_coeff <= 0:
            raise UserError("--distill-target features: the loss is --kl_loss_coeff x the "
                            "feature distance, and --kl_loss_coeff is 0; give it a positive "
                            "weight")
        if args.distillation_type != "none":
            raise UserError(f"--distillation-type {args.distillation_type} trains a "
                            f"distillation head on a teacher's classes; --distill-target "
                            f"features trains a backbone without one (--distillation-type none)")
    elif str(args.data_set).upper() in LABEL_FREE_SETS:
        raise UserError(f"--data-set {args.data_set} has no labels: prune or finetune with "
                        f"--distill-target features (and the full model: --pretrained-path)")
    if args.distillation_type == "none" and args.teacher_path:
        raise UserError(f"--teacher-path {args.teacher_path} is given but --distillation-type is "
                        f"none, so no teacher would be used; add --distillation-type hard (or "
                        f"soft), or drop --teacher-path")


def build_loaders(args, need_train: bool = True):
    """(train_loader or None, val_loader, nb_classes, train_sampler or None).

    The train sampler is a SeededSampler: call its set_epoch(epoch, skip) every epoch.
    """
    dataset_val, nb_classes = build_dataset(False, args)
    train_loader = sampler_train = None
    pin = args.pin_mem and str(args.device).startswith("cuda")  # the chosen device, not the machine
    world, rank = utils.get_world_size(), utils.get_rank()
    if need_train:
        dataset_train, nb_train = build_dataset(True, args)
        if nb_train != nb_classes:
            raise UserError(f"--data-path: train has {nb_train} classes but val has {nb_classes}")
        # as DeiT, repeated augmentation also with one process; both samplers shuffle with an
        # explicit per-epoch seed, never the global RNG
        if args.repeated_aug:
            base = RASampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
        else:
            base = DistributedSampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
        sampler_train = SeededSampler(base, args.seed, rank)
        dataset_train = SeededDataset(dataset_train)
        if len(base) < args.batch_size * args.grad_accum_steps:
            raise UserError(f"--batch-size {args.batch_size} x --grad-accum-steps "
                            f"{args.grad_accum_steps} is larger than the {len(base)} training "
                            f"images each process gets per epoch")
        train_loader = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                  num_workers=args.num_workers, pin_memory=pin,
                                  drop_last=True)
    if args.distributed and args.dist_eval:
        sampler_val = ShardSampler(dataset_val, world, rank)
    else:
        sampler_val = SequentialSampler(dataset_val)
    val_loader = DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
                            num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    return train_loader, val_loader, nb_classes, sampler_train


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy in eval mode with no gradients: the full model of the pruning KL term."""
    full = copy.deepcopy(model).eval()
    for p in full.parameters():
        p.requires_grad_(False)
    return full


def distributed_model(args, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DDP when the run has several processes (unchanged otherwise).

    A distilled model whose only loss is the label loss on the class head
    (--distillation-type none --base-loss-head cls, as DeiT's code) gives its distillation
    head no gradient; DDP then has to be told to look for unused parameters, or it stops on
    the second step waiting for their reduction.
    """
    if not args.distributed:
        return model
    unused = (getattr(model, "distilled", False) and args.distillation_type == "none"
              and args.base_loss_head == "cls")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=unused)


def compile_model(args, model: torch.nn.Module) -> torch.nn.Module:
    """--torchcompile BACKEND: the model torch.compile'd (after DDP, as timm does, so DDP's
    hooks stay outside the graphs); unchanged without the flag."""
    if not args.torchcompile:
        return model
    if args.torchcompile_mode and args.torchcompile != "inductor":
        raise UserError(f"--torchcompile-mode is inductor's; --torchcompile {args.torchcompile} "
                        f"takes none")
    try:
        torch._dynamo.lookup_backend(args.torchcompile)
    except Exception as e:  # an unknown name: dynamo's InvalidBackend, with its list
        raise UserError(f"--torchcompile {args.torchcompile}: {e}") from None
    return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)


def build_mixup(args, nb_classes: int):
    active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if not active:
        return None
    # a label-free run (no classes) mixes the images alike for student and full model; the
    # mixed targets are not read
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=max(nb_classes, 1))


def build_base_criterion(args, mixup_fn) -> torch.nn.Module:
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing if mixup_fn is None else 0.0)
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


# DeiT's (and the NViT reference's) teacher is regnety_160-a5fe301d.pth; timm holds the same
# weights as the `deit_in1k` tag, while a bare `regnety_160` would be timm's default tag.
DEIT_TEACHERS = {"regnety_160": "regnety_160.deit_in1k"}


def build_teacher(args, nb_classes: int, device) -> torch.nn.Module | None:
    """The CNN (or any timm) teacher of DeiT's distillation, weights from a file or URL, or
    without --teacher-path timm's copy of DeiT's teacher (other names: timm's default tag)."""
    if args.distillation_type == "none":
        return None
    path = args.teacher_path
    if path and not path.startswith(("http://", "https://")) and not os.path.isfile(path):
        raise UserError(f"--teacher-path {path} does not exist")
    if path:
        ckpt = models.read_checkpoint(path)
        if "dims" in ckpt:  # one of our own models as teacher
            teacher = models.build_model(args.model, checkpoint=path, num_classes=nb_classes)
        else:
            try:
                teacher = timm.create_model(args.teacher_model, pretrained=False,
                                            num_classes=nb_classes, global_pool="avg")
            except RuntimeError as e:
                raise UserError(f"--teacher-model {args.teacher_model}: {e}") from None
            state = models.checkpoint.state_dict_of(ckpt, f"--teacher-path {path}")
            try:
                teacher.load_state_dict(state)
            except RuntimeError:
                raise UserError(f"--teacher-path {path} does not hold weights of "
                                f"{args.teacher_model} with {nb_classes} classes") from None
    else:
        name = DEIT_TEACHERS.get(args.teacher_model, args.teacher_model)
        problem = download_problem(name)
        if problem:
            raise UserError(f"--teacher-model {args.teacher_model}: timm cannot download the "
                            f"weights of {name}: {problem}; pass --teacher-path FILE")
        print(f"teacher: timm's pretrained {name} (no --teacher-path given)")
        try:
            teacher = timm.create_model(name, pretrained=True, num_classes=nb_classes)
        except Exception as e:
            raise UserError(f"--teacher-model {args.teacher_model}: no --teacher-path given and "
                            f"timm could not get the weights of {name} "
                            f"({str(e).splitlines()[0][:100]}); pass --teacher-path FILE") from None
    return teacher.to(device).eval()


def build_full_model(args, nb_classes: int, device) -> torch.nn.Module | None:
    """The frozen pretrained model of the KL term (a backbone for the feature term); loaded
    only when --kl_loss_coeff > 0."""
    if args.kl_loss_coeff <= 0:
        return None
    classes = {} if label_free(args) else {"num_classes": nb_classes}
    if args.pretrained_path:
        full = models.build_model(args.model, checkpoint=args.pretrained_path,
                                  img_size=args.input_size, **classes, **timm_kwargs(args))
    elif args.pretrained:
        full = models.build_model(args.model, pretrained=True, img_size=args.input_size,
                                  **classes, **timm_kwargs(args))
    else:
        raise UserError("--kl_loss_coeff > 0 needs the full model: pass --pretrained "
                        "(timm weights of --model) or --pretrained-path FILE")
    full = for_objective(args, full)
    return full.to(device).eval()


def build_criterion(args, nb_classes: int, mixup_fn, device, kl_tau: float, per_head: bool,
                    full_model: torch.nn.Module | None = None,
                    student: torch.nn.Module | None = None,
                    channels: list[int] | None = None) -> torch.nn.Module:
    """DeiT loss (with the CNN teacher) plus the KL term at temperature `kl_tau`, per head
    pair or on the heads' mean; `full_model` if already at hand. A `student` without a
    distillation token is refused before any teacher is fetched. Label-free
    (--distill-target features): the feature distance to the full model alone, `channels`
    the full model's output channels a compact student holds (None: all)."""
    if label_free(args):
        if full_model is None:
            full_model = build_full_model(args, nb_classes, device)
        return FeatureDistillLoss(full_model, args.kl_loss_coeff, args.distill_loss,
                                  args.distill_tokens, channels).to(device)
    if student is not None and args.distillation_type != "none" and not student.distilled:
        raise UserError(f"--distillation-type {args.distillation_type} needs a model with a "
                        f"distillation token and head, and {args.model} (or the checkpoint's "
                        f"dims) has none: take a *_distilled_* model or --distillation-type none")
    base = build_base_criterion(args, mixup_fn)
    teacher = build_teacher(args, nb_classes, device)
    deit = DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha,
                            args.distillation_tau, base_on=args.base_loss_head)
    if full_model is None:
        full_model = build_full_model(args, nb_classes, device)
    return FullModelKLLoss(deit, full_model, args.kl_loss_coeff, args.original_loss_coeff,
                           kl_tau, per_head=per_head)


def scaled_lr(args) -> float:
    """DeiT: the learning rate is given for a total batch (per optimizer step) of 512."""
    if args.unscale_lr:
        return args.lr
    return args.lr * total_batch(args) / 512.0


def total_batch(args) -> int:
    """The images per optimizer step, over all processes and accumulation steps."""
    return args.batch_size * args.grad_accum_steps * utils.get_world_size()


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    kwargs = {}
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=scaled_lr(args),
                                   weight_decay=args.weight_decay, momentum=args.momentum, **kwargs)
    except (AssertionError, ValueError) as e:
        raise UserError(f"--opt {args.opt}: {e}") from None


def build_scheduler(args, optimizer):
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs,
            decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
            warmup_epochs=args.warmup_epochs, noise=args.lr_noise, noise_pct=args.lr_noise_pct,
            noise_std=args.lr_noise_std, noise_seed=args.seed)
    except (AssertionError, ValueError) as e:
        raise UserError(f"--sched {args.sched}: {e}") from None
    if scheduler is None:
        raise UserError(f"--sched {args.sched} is not a timm scheduler (cosine, step, plateau, ...)")
    return scheduler


def init_model_ema(args, model: torch.nn.Module):
    if not args.model_ema:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=args.model_ema_decay,
                      device="cpu" if args.model_ema_force_cpu else None)
