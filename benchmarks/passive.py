"""`--passive` for the studies, and the machine-state note under their tables.

Import this before torch: the OpenMP wait policy is read once, when torch's OpenMP runtime
starts. Spinning threads (the default) collapse when another process (or a DataLoader
worker) holds one of the cores; `--passive` makes them sleep instead (bench_omp_policy.py
measures both sides of that trade).
"""
from __future__ import annotations

import os
import sys

if "--passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def omp_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY", "default (spinning)")


MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def malloc_setting() -> str:
    """glibc's thresholds as this process started with them: whether freed memory is kept
    (benchmarks/README.md finding 1) changes CPU latencies and their run-to-run spread."""
    set_ = [f"{v}={os.environ[v]}" for v in MALLOC_VARS if v in os.environ]
    return " ".join(set_) if set_ else "glibc defaults"


def machine_note(load_at_start: tuple) -> str:
    """The OpenMP policy, the malloc thresholds and the load average at start and end, for
    the results table."""
    return (f"OpenMP wait policy: {omp_policy()}; malloc: {malloc_setting()}; 1-minute load "
            f"average {load_at_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end "
            f"({os.cpu_count()} cores).")
