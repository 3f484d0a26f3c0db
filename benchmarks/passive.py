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


def machine_note(load_at_start: tuple) -> str:
    """The OpenMP policy and the load average at start and end, for the results table."""
    return (f"OpenMP wait policy: {omp_policy()}; 1-minute load average {load_at_start[0]:.1f} "
            f"at start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores).")
