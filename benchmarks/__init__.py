"""The benchmark studies; run each as `python -m benchmarks.NAME` from the repository root."""
