"""Side by side (pytest -n 2 on 2 cores) every worker, and every script it starts, gets one
OpenMP thread: two processes each spinning two threads on two cores run torch 10-40x slower."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
