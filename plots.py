"""Figures of a pruning run: per-block widths of the pruned model against the original."""
from __future__ import annotations

import os

from atomic import atomic_path

PANELS = (("num_heads", "heads"), ("qk_dim", "QK width per head"), ("v_dim", "V width per head"),
          ("mlp_dim", "MLP width"))


def plot_widths(original: dict, pruned: dict, path: str | os.PathLike, title: str = "") -> None:
    """Bar chart per kind: original vs pruned width of every block; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = len(original["num_heads"])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    blocks = list(range(depth))
    for ax, (key, label) in zip(axes, PANELS):
        ax.bar([b - 0.2 for b in blocks], original[key], width=0.4, label="original", color="#bbbbbb")
        ax.bar([b + 0.2 for b in blocks], pruned[key], width=0.4, label="pruned", color="#3b75af")
        ax.set_title(label)
        ax.set_xlabel("block")
        ax.set_xticks(blocks)
    axes[0].legend()
    fig.suptitle(title or f"embedding width {original['embed_dim']} -> {pruned['embed_dim']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
