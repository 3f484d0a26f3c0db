"""Datasets and transforms for training and evaluation.

One entry point, `build_dataset`, maps the `--data-set` flag to a torch Dataset plus its
class count, so the training script never needs to know where images come from. Every
problem a user can cause (wrong path, wrong layout, unknown set) becomes a `UserError`
that names the flag to fix.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from functools import lru_cache
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from errors import UserError

DATA_SETS = ("IMNET", "FOLDER", "CIFAR", "CIFAR10", "CIFAR100", "INAT", "INAT19", "DIGITS",
             "IMAGES")
LABEL_FREE_SETS = ("IMAGES",)  # no classes: only a label-free objective can use them
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
IMAGES_VAL_EVERY = 50  # IMAGES: every 50th image (sorted by path) is held out to score a run
INAT_CATEGORIES = (
    "kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name",
)
DIGITS_VAL_FRACTION = 0.2

# The scripts' defaults (DeiT's, with the NViT reference's color jitter), used when the
# Namespace lacks a flag (keeps a minimal Namespace usable).
_DEFAULTS: dict[str, Any] = {
    "color_jitter": 0.4,
    "aa": "rand-m9-mstd0.5-inc1",
    "train_interpolation": "bicubic",
    "reprob": 0.25,
    "remode": "pixel",
    "recount": 1,
    "hflip": 0.5,
    "eval_crop_ratio": 224 / 256,
    "inat_category": "name",
}


def _arg(args: Any, name: str) -> Any:
    """Read a flag from the Namespace, falling back to DeiT's default when absent/None."""
    value = getattr(args, name, None)
    return _DEFAULTS[name] if value is None else value


class BadImage(UserError):
    """An image file that cannot be read (corrupt, truncated, not an image, unreadable)."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:  # re-raised by a DataLoader worker with its whole message
            super().__init__(path)
        else:
            super().__init__(f"--data-path: cannot read image {path}: {reason} (--skip-bad-images "
                             f"skips such files; tools/check_data.py lists them all)")
        self.path, self.reason = path, reason


def _load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (some real sets contain grayscale or CMYK JPEGs); a file that
    cannot be decoded is a BadImage naming it (PIL's own errors do not, for truncated JPEGs)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImage(path, "not an image file PIL can decode") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(path, str(e) or type(e).__name__) from None


# --------------------------------------------------------------------------- bad images
_SKIPPED = mp.Value("q", 0)  # shared with forked DataLoader workers


def skipped_images() -> int:
    """How many unreadable images SkipBadImages has replaced so far in this run."""
    return _SKIPPED.value


class SkipBadImages(Dataset):
    """--skip-bad-images: an unreadable image is replaced by the next readable one, reported
    once on stderr and counted (skipped_images)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        n = len(self.dataset)
        for k in range(n):
            try:
                return self.dataset[(i + k) % n]
            except BadImage as e:
                with _SKIPPED.get_lock():
                    _SKIPPED.value += 1
                sys.stderr.write(f"warning: skipped unreadable image {e.path}: {e.reason}\n")
        raise UserError("--skip-bad-images: no image of the data set can be read")


# --------------------------------------------------------------------------- transforms


def build_transform(is_train: bool, args: Any) -> Callable:
    """DeiT's pipeline: timm RandAugment/erasing for training, resize+center-crop for eval.

    Inputs of 32 px or less (CIFAR, DIGITS) get the CIFAR-style recipe instead of
    RandomResizedCrop, which throws away too much of a tiny image.
    """
    size = getattr(args, "input_size", None)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UserError(f"--input-size must be a positive integer, got {size!r}")
    small = size <= 32

    if is_train:
        # An absent flag means DeiT's default; an explicit None/''/'none' turns it off.
        aa = getattr(args, "aa", _DEFAULTS["aa"])
        if aa is not None and str(aa).strip().lower() in ("", "none"):
            aa = None
        tf = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=_arg(args, "color_jitter"),
            auto_augment=aa,
            interpolation=_arg(args, "train_interpolation"),
            re_prob=_arg(args, "reprob"),
            re_mode=_arg(args, "remode"),
            re_count=_arg(args, "recount"),
            hflip=_arg(args, "hflip"),
        )
        if small:
            # Resize is a no-op on 32x32 CIFAR at size 32 (so this matches DeiT there) but
            # brings 8x8 DIGITS up to size; RandomCrop then jitters position by up to 1/8 of
            # the image (DeiT's padding 4 at 32 px).
            tf.transforms[0] = transforms.Compose([
                transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
                transforms.RandomCrop(size, padding=max(1, size // 8)),
            ])
        return tf

    if small:
        # Tiny inputs: no crop margin to throw away, just bring the image to size.
        steps: list[Callable] = [
            transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),  # no-op for square images; guarantees a square
        ]
    else:
        crop_pct = float(_arg(args, "eval_crop_ratio"))
        if not 0.0 < crop_pct <= 1.0:
            raise UserError(f"--eval-crop-ratio must be in (0, 1], got {crop_pct}")
        steps = [
            transforms.Resize(int(size / crop_pct), interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
        ]
    steps += [
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ]
    return transforms.Compose(steps)


# --------------------------------------------------------------------------- DIGITS


@lru_cache(maxsize=1)
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified split of sklearn digits: (images uint8, targets, train_idx, val_idx).

    Uses its own seeded generator so the split never depends on global RNG state.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_val = int(round(len(idx) * DIGITS_VAL_FRACTION))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return (
        images,
        targets,
        np.sort(np.concatenate(train_idx)),
        np.sort(np.concatenate(val_idx)),
    )


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as RGB PIL images: a tiny real set for CPU smoke runs."""

    def __init__(self, train: bool, transform: Optional[Callable] = None) -> None:
        images, targets, train_idx, val_idx = _digits_split()
        self.indices: np.ndarray = (train_idx if train else val_idx).copy()
        self._images = images[self.indices]
        self.targets: list[int] = targets[self.indices].tolist()
        self.classes: list[str] = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self._images[i]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


# --------------------------------------------------------------------------- iNaturalist


def _read_json(path: str, flag_hint: str) -> Any:
    """Load a json file, turning missing/corrupt files into a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"--data-path: expected {flag_hint} at {path}, file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--data-path: could not read {path} as json ({e})") from e


class INatDataset(Dataset):
    """iNaturalist 2018/2019 from its json annotations, labelled at a chosen taxonomy level.

    The class index is always built from the *train* annotations so train and val agree.
    Image paths are `file_name` relative to root (official layout); DeiT's flattened layout
    (`<dir>/<category_id>/<file>`, supercategory folder dropped) is accepted as well.
    """

    def __init__(
        self,
        root: str,
        train: bool = True,
        year: int = 2018,
        category: str = "name",
        transform: Optional[Callable] = None,
    ) -> None:
        if category not in INAT_CATEGORIES:
            raise UserError(
                f"--inat-category must be one of {', '.join(INAT_CATEGORIES)}, got {category!r}"
            )
        self.root = root
        self.transform = transform
        split = "train" if train else "val"
        data = _read_json(os.path.join(root, f"{split}{year}.json"), f"{split}{year}.json")
        train_data = data if train else _read_json(
            os.path.join(root, f"train{year}.json"), f"train{year}.json"
        )
        for d in (data, train_data):
            if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
                raise UserError(
                    f"--data-path: iNat json files in {root} need 'images' and 'annotations' lists"
                )

        # Taxonomy: categories.json (2018 ships the full tree there) or the annotation file.
        cat_path = os.path.join(root, "categories.json")
        cats = (
            _read_json(cat_path, "categories.json")
            if os.path.isfile(cat_path)
            else train_data.get("categories", [])
        )
        try:
            level_of = {int(c["id"]): c[category] for c in cats}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"--inat-category {category!r}: the iNat category table in {root} has no "
                f"field {e} for some category"
            ) from e

        def labels(d: Any) -> dict[int, int]:
            try:
                return {int(a["image_id"]): int(a["category_id"]) for a in d["annotations"]}
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"--data-path: malformed iNat annotations in {root} ({e})") from e

        train_cats = set(labels(train_data).values())
        missing = train_cats - level_of.keys()
        if missing:
            raise UserError(
                f"--data-path: {len(missing)} category ids in train{year}.json are missing "
                f"from the category table in {root}"
            )
        self.classes: list[str] = sorted({str(level_of[c]) for c in train_cats})
        class_to_idx = {name: i for i, name in enumerate(self.classes)}

        image_label = labels(data)
        entries: list[tuple[str, int]] = []
        for img in data["images"]:
            try:
                cat_id = image_label.get(int(img["id"]))
                file_name = str(img["file_name"])
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(
                    f"--data-path: malformed image entry in {split}{year}.json ({e})"
                ) from e
            if cat_id is None:
                continue
            name = str(level_of.get(cat_id))
            if name not in class_to_idx:
                raise UserError(
                    f"--data-path: {split}{year}.json has category {cat_id} not in "
                    f"train{year}.json at level {category!r}"
                )
            entries.append((file_name, class_to_idx[name]))
        if not entries:
            raise UserError(f"--data-path: {split}{year}.json in {root} lists no labelled images")
        to_path = self._pick_layout(entries[0][0])
        self.samples: list[tuple[str, int]] = [(to_path(f), t) for f, t in entries]
        self.targets: list[int] = [t for _, t in entries]

    def _pick_layout(self, first: str) -> Callable[[str], str]:
        """Map file_name to a path; probe one image to choose official vs flattened layout."""

        def official(name: str) -> str:
            return os.path.join(self.root, name)

        def flattened(name: str) -> str:
            parts = name.split("/")
            if len(parts) != 4:
                return official(name)
            return os.path.join(self.root, parts[0], parts[2], parts[3])

        for to_path in (official, flattened):
            if os.path.isfile(to_path(first)):
                return to_path
        raise UserError(
            f"--data-path: image {official(first)} listed in the iNat json does not exist; "
            f"expected the images under {self.root} as named by each entry's file_name"
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        img = _load_rgb(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


# --------------------------------------------------------------------------- builders


class UnlabeledImages(Dataset):
    """--data-set IMAGES: every image file under a folder, recursively, with no classes.

    Paths are sorted, so every process and every run sees the same order; every
    IMAGES_VAL_EVERY-th one (at least one) is the val split, the rest the train split.
    Items are (image, 0): the 0 is a placeholder no label-free loss reads.
    """

    classes: list[str] = []

    def __init__(self, root: str, train: bool, transform: Optional[Callable] = None) -> None:
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True)
                       for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise UserError(f"--data-path {root} holds no image files (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)} in every subfolder)")
        held_out = paths[::IMAGES_VAL_EVERY]
        self.paths = [p for i, p in enumerate(paths) if i % IMAGES_VAL_EVERY] if train \
            else held_out
        if not self.paths:
            raise UserError(f"--data-path {root} holds {len(paths)} image(s): too few to hold "
                            f"one of every {IMAGES_VAL_EVERY} out for validation and train on "
                            f"the rest")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = _load_rgb(self.paths[i])
        return (self.transform(img) if self.transform else img), 0


def _require_dir(data_path: Optional[str], data_set: str, layout: str) -> str:
    """Fail early, naming --data-path, when the dataset root is unset or absent."""
    if not data_path:
        raise UserError(f"--data-path is required for --data-set {data_set}; expected {layout}")
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} is not a directory; expected {layout}")
    return data_path


def _class_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _image_folder(data_path: Optional[str], is_train: bool, data_set: str,
                  transform: Callable) -> datasets.ImageFolder:
    """ImageFolder at DIR/train or DIR/val with errors that say which layout is expected."""
    layout = "ImageFolder layout DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"
    root = _require_dir(data_path, data_set, layout)
    split = "train" if is_train else "val"
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"--data-path {root} has no '{split}/' folder; expected {layout}")
    try:
        ds = datasets.ImageFolder(split_dir, transform=transform, loader=_load_rgb)
    except FileNotFoundError as e:
        raise UserError(f"--data-path {split_dir}: {e} Expected {layout}") from e
    # Labels come from sorted folder names, so val must have exactly train's classes.
    train_dir = os.path.join(root, "train")
    if not is_train and os.path.isdir(train_dir):
        train_classes = _class_dirs(train_dir)
        if ds.classes != train_classes:
            raise UserError(
                f"--data-path {root}: val/ has {len(ds.classes)} class folders but train/ has "
                f"{len(train_classes)} (or their names differ); labels would not match"
            )
    return ds


def _cifar(data_path: Optional[str], is_train: bool, data_set: str,
           transform: Callable) -> Dataset:
    """torchvision CIFAR without downloading: the batches must already be on disk."""
    hundred = data_set == "CIFAR100"  # "CIFAR" is CIFAR-10, as in the NViT reference
    folder = "cifar-100-python/" if hundred else "cifar-10-batches-py/"
    layout = f"the CIFAR python batches in DIR/{folder}"
    root = _require_dir(data_path, data_set, layout)
    cls = datasets.CIFAR100 if hundred else datasets.CIFAR10
    try:
        return cls(root, train=is_train, transform=transform, download=False)
    except RuntimeError as e:
        raise UserError(
            f"--data-path {root}: {data_set} not found or corrupted; expected {layout} "
            f"(nothing is downloaded)"
        ) from e


def build_dataset(is_train: bool, args: Any, augment: bool | None = None
                  ) -> tuple[Dataset, int]:
    """Build the train or val split named by --data-set; returns (dataset, nb_classes).
    `augment` (default: is_train) picks the training transform or the evaluation one (the
    train split without augmentation: frozen-feature probes)."""
    raw = getattr(args, "data_set", None)
    data_set = str(raw).upper() if raw is not None else ""
    if data_set not in DATA_SETS:
        raise UserError(f"--data-set must be one of {', '.join(DATA_SETS)}, got {raw!r}")
    transform = build_transform(is_train if augment is None else augment, args)
    data_path = getattr(args, "data_path", None)

    if data_set in ("IMNET", "FOLDER"):
        ds = _image_folder(data_path, is_train, data_set, transform)
    elif data_set in ("CIFAR", "CIFAR10", "CIFAR100"):
        ds = _cifar(data_path, is_train, data_set, transform)
    elif data_set in ("INAT", "INAT19"):
        year = 2018 if data_set == "INAT" else 2019
        root = _require_dir(
            data_path, data_set, f"DIR/train{year}.json, DIR/val{year}.json and the images"
        )
        ds = INatDataset(root, train=is_train, year=year,
                         category=_arg(args, "inat_category"), transform=transform)
    elif data_set == "IMAGES":
        root = _require_dir(data_path, data_set, "image files in DIR and its subfolders")
        ds = UnlabeledImages(root, is_train, transform)
    else:  # DIGITS
        ds = DigitsDataset(train=is_train, transform=transform)
    n_classes = len(ds.classes)
    if getattr(args, "skip_bad_images", False):
        ds = SkipBadImages(ds)
    return ds, n_classes
