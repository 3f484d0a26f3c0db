"""Figures of a pruning run: per-block widths of the pruned model against the original, and
top-1 against cost for the models of a run with several targets."""
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


def plot_pareto(points: list[dict], dense_score: float | None, cost: str, key: str,
                path: str | os.PathLike) -> None:
    """Score against cost ratio: the dense model at 1 and one point per target reached
    (`points`: dicts with "ratio", `key` ("test_acc1"; label-free "test_cos"), "target");
    written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["ratio"] for p in points]
    ys = [p[key] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if dense_score is not None:
        xs, ys = [1.0, *xs], [dense_score, *ys]
        ax.annotate("dense", (1.0, dense_score), textcoords="offset points", xytext=(-30, 6))
    ax.plot(xs, ys, "o-", color="#3b75af")
    for p in points:
        ax.annotate(f"target {p['target']:g}", (p["ratio"], p[key]),
                    textcoords="offset points", xytext=(4, 6))
    ax.set_xlabel(f"{cost} ratio to the dense model")
    ax.set_ylabel(("top-1 (%)" if key == "test_acc1" else "feature cosine to the full model")
                  + " when the target is reached")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
