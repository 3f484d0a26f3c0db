"""Command-line tools over the library; run each as `python -m tools.NAME` from the repository root."""
