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
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise UserError(f"could not write {path}: {e.strerror or e}{kept}") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
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
