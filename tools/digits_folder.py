"""Write scikit-learn's DIGITS as image files: a real image folder for the CPU demos.

    python -m tools.digits_folder OUT                  # OUT/<split>/<index>.png, no labels
    python -m tools.digits_folder OUT --with-classes   # OUT/train/<digit>/, OUT/val/<digit>/

The first is what `--data-set IMAGES --data-path OUT` reads (a label-free run), the second
what `--data-set FOLDER` reads; both hold the same images as `--data-set DIGITS`, as 8x8 PNGs.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import shutil
import sys
from pathlib import Path

from datasets import DigitsDataset
from errors import UserError
from flags import tool_call


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Write DIGITS as an image folder", add_help=True)
    p.add_argument("output", help="a folder that does not exist yet, or an empty one")
    p.add_argument("--with-classes", action="store_true",
                   help="one subfolder per digit (FOLDER's layout) instead of none (IMAGES')")
    return p


def write(output: Path, with_classes: bool) -> int:
    """Every image of both splits as a PNG, written beside OUT and moved there whole (an
    interrupted run leaves no half folder); returns how many."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output} exists and is not an empty folder")
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    n = 0
    for split in ("train", "val"):
        ds = DigitsDataset(train=split == "train")
        for i in range(len(ds)):
            img, label = ds[i]
            folder = staging / split / (str(label) if with_classes else "")
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{int(ds.indices[i]):04d}.png")
            n += 1
    if output.exists():
        output.rmdir()  # empty, checked above
    staging.rename(output)
    return n


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    code, n = tool_call(lambda: write(Path(args.output), args.with_classes), io="write")
    if code:
        return code
    print(f"wrote {n} images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
