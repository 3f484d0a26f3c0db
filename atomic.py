"""Atomic file writes: a temporary file beside the target, renamed over it when complete.

A killed run or a full disk never leaves half a file under the final name, and a failed
write removes its temporary file and becomes one line naming the file and the OS's reason
("No space left on device"). Every writer of results, checkpoints, tables and plots goes
through `atomic_path`; the temporary names are the ones run_folder.py clears after a kill.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it goes."""
    from errors import UserError
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise UserError(f"could not write {path}: {e.strerror or e}{kept}") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def check_output_file(path: str | os.PathLike, flag: str, force: bool = False) -> Path:
    """Before any work: an output file must be new (or --force given) and its folder, or the
    nearest existing parent that will hold it, writable. Creates nothing."""
    from errors import UserError
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file")
    if path.exists() and not force:
        raise UserError(f"{flag} {path} already exists; pass --force to replace it")
    base = nearest_existing(path.parent)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable ({base} is not a writable folder)")
    return path


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` or its nearest existing parent: where a file or folder to be made would live."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically. Through a Python file object: a full disk then raises the OS
    error (torch's own file writer reports it as "unexpected pos")."""
    import torch
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
