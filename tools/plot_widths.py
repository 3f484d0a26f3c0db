"""Plot per-block widths of a pruned model against the original (the paper's redistribution figure).

    python -m tools.plot_widths OUT/dims_history.json [--output widths.png]
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import json
import sys
from pathlib import Path

from errors import UserError
from atomic import check_output_file
from flags import Parser, user_message
from plots import plot_widths


def main() -> None:
    p = Parser(__doc__.splitlines()[0])
    p.add_argument("history", help="dims_history.json written by nvit_prune.py")
    p.add_argument("--output", default=None, help="PNG path (default: beside the history)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    args = p.parse_args()
    try:
        out = args.output or str(Path(args.history).with_name("widths.png"))
        check_output_file(out, "--output", args.force)
        try:
            history = json.loads(Path(args.history).read_text())
            original, final = history["original"], history["steps"][-1]["dims"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise UserError(f"{args.history} is not a dims history with at least one step ({e})")
        plot_widths(original, final, out)
        print(f"wrote {out}")
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
