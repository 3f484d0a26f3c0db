"""Atomic file writes: a temporary file beside the target, renamed over it when complete.

A killed run or a full disk never leaves half a file under the final name, and a failed
write removes its temporary file. Every writer of results, checkpoints, tables and plots
goes through `atomic_path`.
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
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create the folder if needed and check that a file can be written in it, before any
    work starts; a one-line error names the flag otherwise."""
    from errors import UserError
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {out} is not writable: {e.strerror or e}") from None
    return out


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
