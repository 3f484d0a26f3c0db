"""List every image of a data set that cannot be read, before a run trips over one.

    python -m tools.check_data --data-set FOLDER --data-path DIR [--num_workers 8]

Decodes each image of the train and val splits exactly as training does (same loader, same
data-set flags) and prints one line per bad file; exits 1 when any is bad, 0 when all are
readable. A run can then either drop those files or train with --skip-bad-images.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import sys
from types import SimpleNamespace

from torch.utils.data import DataLoader, Dataset

import flags
import utils
from datasets import BadImage, build_dataset


class Probe(Dataset):
    """Item i of a data set as None (readable) or the reason it is not, never an exception."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            self.dataset[i]
            return None
        except BadImage as e:
            return f"{e.path}: {e.reason}"


def get_args_parser() -> flags.Parser:
    p = flags.Parser("List the unreadable images of a data set")
    p.add_argument("--data-set", default="IMNET", type=str.upper,
                   help="IMNET, FOLDER, CIFAR (= CIFAR10), CIFAR100, INAT, INAT19, DIGITS")
    p.add_argument("--data-path", default=None)
    p.add_argument("--inat-category", default="name")
    p.add_argument("--num_workers", "--num-workers", default=4, type=flags.COUNT)
    return p


def bad_images(args) -> list[str]:
    """'path: reason' for every unreadable image of both splits."""
    frame = SimpleNamespace(data_set=args.data_set, data_path=args.data_path,
                            inat_category=args.inat_category, input_size=32, aa="none")
    bad = []
    for is_train in (True, False):
        dataset, _ = build_dataset(is_train, frame)
        loader = DataLoader(Probe(dataset), batch_size=64, num_workers=args.num_workers,
                            collate_fn=list)
        for batch in loader:
            bad.extend(r for r in batch if r is not None)
        print(f"{'train' if is_train else 'val'}: {len(dataset)} images checked", flush=True)
    return bad


def main(args) -> None:
    bad = bad_images(args)
    for line in bad:
        print(f"bad image {line}")
    if bad:
        print(f"{len(bad)} unreadable image(s)")
        sys.exit(1)
    print("every image is readable")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args())

