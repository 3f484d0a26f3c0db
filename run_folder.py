"""An output folder belongs to one run at a time: a lock file naming the process that holds it.

`check_output_dir` only looks (nothing is created while the inputs are still being checked);
`claim` creates the folder, takes the lock and clears the temporary files of dead runs once
everything has passed. A lock left by a dead process on this host is taken over with a
message; a live one, or one from another host (whose process cannot be checked from here),
refuses the second run.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from atomic import nearest_existing
from errors import UserError

LOCK_FILE = "run.lock"
TEMP_PATTERNS = (".*.tmp[0-9]*", ".write_test*")  # atomic.py's temporary names


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live run from a reused pid), Linux only."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def _read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder(lock: Path) -> str | None:
    """Who holds the lock, if a live run does (None: nobody, or a dead process)."""
    info = _read_lock(lock)
    host, pid = info.get("host"), info.get("pid")
    if not isinstance(pid, int):
        return None  # unreadable: a run killed while writing its lock
    if host != socket.gethostname():
        return f"process {pid} on {host} (if it is dead, remove {lock})"
    if pid != os.getpid() and _alive(pid, info.get("started")):
        return f"process {pid} (started {info.get('date', '?')})"
    return None


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Refuse, before any work, a folder that cannot be written or that a live run holds."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder")
    base = nearest_existing(out)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out} is not writable ({base} does not allow it)")
    holder = _holder(out / LOCK_FILE) if out.is_dir() else None
    if holder:
        raise UserError(f"{flag} {out} is in use by another run: {holder}")
    return out


def claim(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create the folder, take its lock (released at exit) and remove dead runs' temp files."""
    out = check_output_dir(path, flag)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {out} cannot be created: {e.strerror or e}") from None
    lock = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
          "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder:
                raise UserError(f"{flag} {out} is in use by another run: {holder}") from None
            print(f"{flag} {out}: taking over the lock of a run that is no longer alive "
                  f"({_read_lock(lock).get('pid', '?')})")
            lock.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise UserError(f"{flag} {out} is not writable: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise UserError(f"{flag} {out}: another run took the lock at the same moment")
    removed = [p for pattern in TEMP_PATTERNS for p in out.glob(pattern) if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        print(f"{flag} {out}: removed {len(removed)} temporary file(s) of a killed run "
              f"({', '.join(p.name for p in removed[:3])}{', ...' if len(removed) > 3 else ''})")
    _claimed.append((out, created))
    return out


_claimed: list[tuple[Path, bool]] = []


@atexit.register
def release_all() -> None:
    """Drop our locks; a folder this run created and left empty goes too."""
    while _claimed:
        out, created = _claimed.pop()
        lock = out / LOCK_FILE
        if _read_lock(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()  # only if empty
            except OSError:
                pass
