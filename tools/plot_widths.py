"""Plot per-block widths of a pruned model against the original (the paper's redistribution figure).

    python -m tools.plot_widths OUT/dims_history.json [--output widths.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from errors import UserError
from flags import user_message
from plots import plot_widths


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
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
