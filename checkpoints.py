"""What the entry scripts write and read back: file names, checkpoint schemas, resume.

Writes are atomic (atomic.py); reads go through `models.read_checkpoint`, which never
unpickles arbitrary objects. A checkpoint holds tensors and plain values only.

Crash consistency of a training run: each epoch writes checkpoint.pth first, and it carries
everything the other files are made from (the log history, the best epoch), so a resume
re-derives log.txt and best_checkpoint.pth whatever instant a kill hit.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

from atomic import copy_atomic, save_atomic, write_text_atomic
from errors import UserError
from flags import plain
from utils import json_lines

CHECKPOINT_FILE = "checkpoint.pth"  # revit_scratch.py: the latest epoch, for --resume
BEST_FILE = "best_checkpoint.pth"
LOG_FILE = "log.txt"
PRUNED_FILE = "pruned_checkpoint.pth"  # nvit_prune.py's compact model; --finetune FOLDER finds it
PRUNING_STATE_FILE = "pruning_state.pth"  # nvit_prune.py's resumable state
PARETO_FILE = "pareto.png"  # nvit_prune.py with several targets: top-1 against cost
HISTORY_FILE = "dims_history.json"
TRAINING_RUN_FILES = (CHECKPOINT_FILE, BEST_FILE, LOG_FILE)
PRUNING_RUN_FILES = (PRUNING_STATE_FILE, PRUNED_FILE, HISTORY_FILE, LOG_FILE)
TRAINING_KEYS = ("optimizer", "lr_scheduler", "epoch")


def cpu_tensors(value):
    """Every tensor of a checkpoint on the CPU, so that a plain torch.load works on a machine
    without the GPU it was written on (CPU tensors are not copied)."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: cpu_tensors(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(cpu_tensors(v) for v in value)
    return value


def _save(obj: dict, path: Path) -> None:
    save_atomic(cpu_tensors(obj), path)


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


def new_run_id() -> str:
    """Names a run; every checkpoint, state and model file it writes carries it."""
    return uuid.uuid4().hex[:12]


def _run_of(path: str) -> tuple[str | None, str]:
    """(run id, output folder) recorded in a checkpoint, without reading its tensors."""
    from models.checkpoint import peek_checkpoint
    ckpt = peek_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    return ckpt.get("run_id"), str(args.get("output_dir") or Path(path).parent)


def refuse_foreign_resume(resume: str | None, output_dir: Path | None, own_file: str,
                          names: tuple[str, ...]) -> None:
    """--resume FILE must not mix two runs in one folder: FILE has to be the folder's own run
    (same file or same run id) unless the folder holds no run yet."""
    if not resume or output_dir is None or not any((output_dir / n).exists() for n in names):
        return
    own = output_dir / own_file
    if own.is_file() and not is_url(resume) and os.path.samefile(resume, own):
        return
    theirs, their_dir = _run_of(resume)
    ours = _run_of(str(own))[0] if own.is_file() else None
    if theirs is not None and theirs == ours:
        return
    raise UserError(f"--resume {resume} is a checkpoint of the run in {their_dir} (id {theirs}), "
                    f"but --output_dir {output_dir} already holds another run (id {ours}); "
                    f"continue it in its own folder or in a new --output_dir")


def check_run_files(resume: str | None, output_dir: Path, own_file: str,
                    names: tuple[str, ...]) -> None:
    """Before any work: a fresh run needs a folder without a run, a resume the folder's own."""
    if resume:
        refuse_foreign_resume(resume, output_dir, own_file, names)
    else:
        refuse_to_overwrite(output_dir, names)


def crash_point(name: str, epoch: int) -> None:
    """Test hook for the fault tests: NVIT_TEST_KILL_AT=name:epoch kills this process
    (SIGKILL, nothing flushed) at that point of the epoch's writes."""
    if os.environ.get("NVIT_TEST_KILL_AT") == f"{name}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_epoch_records(output_dir: Path, save_checkpoint, epoch: int, improved: bool,
                        history: list[dict]) -> None:
    """An epoch's files in crash-safe order: the checkpoint (holding the history and best
    epoch) first, then the best copy and log.txt, both re-derivable from it."""
    latest = output_dir / CHECKPOINT_FILE
    save_checkpoint(latest)
    crash_point("checkpoint", epoch)
    if improved:
        copy_atomic(latest, output_dir / BEST_FILE)
    crash_point("best", epoch)
    write_text_atomic(output_dir / LOG_FILE, json_lines(history))
    crash_point("log", epoch)


def read_log(path: Path) -> list[dict]:
    """log.txt's records; lines that are not JSON records (a torn last line) are left out."""
    records = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def restore_epoch_records(ckpt: dict, resume: str, output_dir: Path | None) -> list[dict]:
    """On resume: the log history up to the checkpoint's epoch, with log.txt rewritten from it
    and best_checkpoint.pth restored if a kill came between the checkpoint and its copy."""
    epoch = ckpt["epoch"]
    history = ckpt.get("log")
    if history is None:  # written before checkpoints carried the log: trust log.txt's lines
        history = [r for r in read_log(output_dir / LOG_FILE) if r.get("epoch", -1) <= epoch] \
            if output_dir is not None else []
    if output_dir is None:
        return list(history)
    write_text_atomic(output_dir / LOG_FILE, json_lines(history))
    best = output_dir / BEST_FILE
    if ckpt.get("best_epoch") == epoch:
        best_epoch = None
        if best.is_file():
            from models.checkpoint import peek_checkpoint
            best_epoch = peek_checkpoint(best).get("epoch")
        if best_epoch != epoch:
            copy_atomic(resume, best)
            print(f"--resume: {best} restored (epoch {epoch}, written before the run stopped)")
    return list(history)


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
                             epoch: int, args, max_accuracy: float, best_epoch: int | None,
                             history: list[dict], run_id: str) -> None:
    _save({**model_entry(model), **training_state(optimizer, scheduler, scaler),
                 "epoch": epoch,
                 "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                 "max_accuracy": max_accuracy, "best_epoch": best_epoch, "log": plain(history),
                 "run_id": run_id, "args": plain(vars(args))}, path)


def save_pruning_state(path: Path, model, loop, optimizer, scheduler, scaler, settings: dict,
                       original_dims, args, run_id: str, dense_score: dict,
                       epoch_log: list[dict], epoch_means: dict) -> None:
    """nvit_prune.py's resumable state: the gated model's weights, the pruning loop's state
    (masks, saliency, pruner, position, prune-step history), the optimizer's, the epochs'
    log records and the current epoch's running sums, and what must not change.
    dense_score: engine.score_fields of the dense model ({} before it was scored)."""
    _save({**model_entry(model), **loop.state_dict(),
           **training_state(optimizer, scheduler, scaler), "settings": settings,
           "original_dims": original_dims.to_dict(), "run_id": run_id,
           **dense_score, "epoch_log": plain(epoch_log),
           "epoch_means": plain(epoch_means), "args": plain(vars(args))},
          path)


def target_file(target: float) -> str:
    """nvit_prune.py's compact model at one of several --latency_target values."""
    return f"pruned_{target:g}.pth"


def save_model_file(path: Path, model, args, **extra) -> None:
    """A model to --finetune, --eval, export or build_model: weights, dims, the run's flags."""
    _save({**model_entry(model), "args": plain(vars(args)), **plain(extra)}, path)

