"""What the entry scripts write and read back: file names, checkpoint schemas, resume.

Writes are atomic (atomic.py); reads go through `models.read_checkpoint`, which never
unpickles arbitrary objects. A checkpoint holds tensors and plain values only.
"""
from __future__ import annotations

from pathlib import Path

from atomic import save_atomic
from errors import UserError

CHECKPOINT_FILE = "checkpoint.pth"  # revit_scratch.py: the latest epoch, for --resume
BEST_FILE = "best_checkpoint.pth"
LOG_FILE = "log.txt"
PRUNED_FILE = "pruned_checkpoint.pth"  # nvit_prune.py's compact model; --finetune FOLDER finds it
PRUNING_STATE_FILE = "pruning_state.pth"  # nvit_prune.py's resumable state
HISTORY_FILE = "dims_history.json"
TRAINING_RUN_FILES = (CHECKPOINT_FILE, BEST_FILE, LOG_FILE)
PRUNING_RUN_FILES = (PRUNING_STATE_FILE, PRUNED_FILE, HISTORY_FILE)
TRAINING_KEYS = ("optimizer", "lr_scheduler", "epoch")


def plain(value):
    """Reduce argparse values to types torch.load(weights_only=True) accepts."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def resume_path(resume: str, output_dir: str, default_file: str) -> str | None:
    """--resume FILE or URL, or with bare --resume OUTPUT_DIR/default_file if there is one."""
    if not resume:
        return None
    if resume == "auto":
        if not output_dir:
            raise UserError("bare --resume needs --output_dir (or give the checkpoint path)")
        path = Path(output_dir) / default_file
        if not path.is_file():
            print(f"--resume: no {path} yet, starting from the beginning")
            return None
        return str(path)
    if not is_url(resume) and not Path(resume).is_file():
        raise UserError(f"--resume {resume} does not exist")
    return resume


def refuse_to_overwrite(output_dir: Path, names: tuple[str, ...]) -> None:
    """A fresh run must not replace an earlier run's results: ask for --resume or a new dir."""
    taken = [n for n in names if (output_dir / n).exists()]
    if taken:
        raise UserError(f"--output_dir {output_dir} already holds a run ({taken[0]}); pass --resume "
                        f"to continue it, or choose another --output_dir")


# ------------------------------------------------------------------------------ schemas
def model_entry(model) -> dict:
    """The weights and the dims that rebuild them: what every checkpoint of ours starts with."""
    return {"model": model.state_dict(), "dims": model.dims.to_dict()}


def training_state(optimizer, scheduler, scaler) -> dict:
    return {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None}


def restore_training_state(ckpt: dict, source: str, optimizer, scheduler, scaler) -> None:
    """Optimizer, schedule and loss-scaler state of a checkpoint written by `training_state`."""
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"--resume {source} is not a training checkpoint (no {missing[0]}); "
                        f"use --finetune to start from its weights")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError:
        raise UserError(f"--resume {source}: its optimizer state does not fit this model's "
                        f"parameters (written by an nvit before q, k and v became one "
                        f"projection?); use --finetune to start from its weights") from None
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def save_training_checkpoint(path: Path, model, optimizer, scheduler, scaler, model_ema,
                             epoch: int, args, max_accuracy: float) -> None:
    save_atomic({**model_entry(model), **training_state(optimizer, scheduler, scaler),
                 "epoch": epoch,
                 "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                 "max_accuracy": max_accuracy, "args": plain(vars(args))}, path)


def save_pruning_state(path: Path, model, loop, optimizer, scheduler, scaler, settings: dict,
                       original_dims, args) -> None:
    """nvit_prune.py's resumable state: the gated model's weights, the pruning loop's state
    (masks, saliency, pruner, position, history), the optimizer's, and what must not change."""
    save_atomic({**model_entry(model), **loop.state_dict(),
                 **training_state(optimizer, scheduler, scaler), "settings": settings,
                 "original_dims": original_dims.to_dict(), "args": plain(vars(args))}, path)


def save_model_file(path: Path, model, args, **extra) -> None:
    """A model to --finetune, --eval, export or build_model: weights, dims, the run's flags."""
    save_atomic({**model_entry(model), "args": plain(vars(args)), **plain(extra)}, path)

