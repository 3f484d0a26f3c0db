"""Plot per-block widths of a pruned model against the original (the paper's redistribution figure).

    python tools/plot_widths.py OUT/dims_history.json [--output widths.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from errors import UserError  # noqa: E402

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
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("history", help="dims_history.json written by nvit_prune.py")
    p.add_argument("--output", default=None, help="PNG path (default: beside the history)")
    args = p.parse_args()
    try:
        try:
            history = json.loads(Path(args.history).read_text())
            original, final = history["original"], history["steps"][-1]["dims"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise UserError(f"{args.history} is not a dims history with at least one step ({e})")
        out = args.output or str(Path(args.history).with_name("widths.png"))
        plot_widths(original, final, out)
        print(f"wrote {out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
