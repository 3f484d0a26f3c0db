"""build_dataset / build_transform on real (tiny) data, plus the user-facing errors."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, build_transform
from errors import UserError


def _args(**kw) -> Namespace:
    base = dict(data_set="DIGITS", data_path=None, input_size=32, inat_category="name")
    base.update(kw)
    return Namespace(**base)


def _check_sample(ds, size: int, nb_classes: int) -> None:
    img, label = ds[0]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
    assert img.shape == (3, size, size)
    assert torch.isfinite(img).all()
    assert 0 <= int(label) < nb_classes


# --------------------------------------------------------------------------- DIGITS


def test_digits_split_sizes_and_stratification() -> None:
    train, n_tr = build_dataset(True, _args())
    val, n_va = build_dataset(False, _args())
    assert n_tr == n_va == 10
    assert len(train) > 0 and len(val) > 0
    assert len(train) + len(val) == 1797
    assert 0.15 < len(val) / 1797 < 0.25
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert set(train.targets) == set(val.targets) == set(range(10))


def test_digits_split_is_deterministic() -> None:
    a, _ = build_dataset(False, _args())
    np.random.seed(123)
    torch.manual_seed(123)
    b, _ = build_dataset(False, _args(data_path="/ignored"))
    assert a.indices.tolist() == b.indices.tolist()
    assert a.targets == b.targets


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("is_train", [True, False])
def test_digits_samples(size: int, is_train: bool) -> None:
    ds, n = build_dataset(is_train, _args(input_size=size))
    _check_sample(ds, size, n)
    _, label = ds[len(ds) - 1]
    assert label == ds.targets[-1]


def test_digits_image_is_rgb_and_scaled() -> None:
    ds, _ = build_dataset(True, _args())
    ds.transform = None
    img, _ = ds[0]
    assert img.mode == "RGB" and img.size == (8, 8)
    arr = np.asarray(img)
    assert arr.max() > 200  # 0..16 was scaled up to 0..255


# --------------------------------------------------------------------------- ImageFolder


def _write_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 4,
                  splits=("train", "val")) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                pix = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
                img = Image.fromarray(pix)
                if c == classes[0] and i == 0:
                    img = img.convert("L")  # a grayscale JPEG, as real sets contain
                img.save(d / f"{i}.jpg")


@pytest.mark.parametrize("data_set", ["FOLDER", "IMNET"])
@pytest.mark.parametrize("is_train", [True, False])
def test_image_folder(tmp_path: Path, data_set: str, is_train: bool) -> None:
    _write_folder(tmp_path)
    ds, n = build_dataset(is_train, _args(data_set=data_set, data_path=str(tmp_path),
                                          input_size=48))
    assert n == 3 and ds.classes == ["ant", "bee", "cat"]
    assert len(ds) == 12
    assert sorted(set(ds.targets)) == [0, 1, 2]
    _check_sample(ds, 48, n)  # sample 0 is the grayscale one
    assert ds[0][1] == 0 and ds[len(ds) - 1][1] == 2


def test_image_folder_val_classes_must_match_train(tmp_path: Path) -> None:
    _write_folder(tmp_path, splits=("train",))
    _write_folder(tmp_path / "v", classes=("ant", "cat"), splits=("val",))
    (tmp_path / "v" / "val").rename(tmp_path / "val")
    with pytest.raises(UserError, match="--data-path"):
        build_dataset(False, _args(data_set="FOLDER", data_path=str(tmp_path)))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("path", [None, "", "/nonexistent/nvit/data"])
@pytest.mark.parametrize("data_set", ["FOLDER", "IMNET", "CIFAR10", "INAT"])
def test_missing_data_path(path, data_set: str) -> None:
    with pytest.raises(UserError, match="--data-path"):
        build_dataset(True, _args(data_set=data_set, data_path=path))


def test_missing_val_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path, splits=("train",))
    build_dataset(True, _args(data_set="FOLDER", data_path=str(tmp_path)))
    with pytest.raises(UserError, match=r"--data-path.*val/.*DIR/train/<class>"):
        build_dataset(False, _args(data_set="FOLDER", data_path=str(tmp_path)))


def test_empty_class_tree(tmp_path: Path) -> None:
    (tmp_path / "train" / "ant").mkdir(parents=True)
    (tmp_path / "train" / "bee").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--data-path.*ImageFolder layout"):
        build_dataset(True, _args(data_set="IMNET", data_path=str(tmp_path)))


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="--data-path"):
        build_dataset(True, _args(data_set="FOLDER", data_path=str(tmp_path)))


@pytest.mark.parametrize("name", ["MNIST", "", None])
def test_unknown_data_set(name) -> None:
    with pytest.raises(UserError, match=r"--data-set.*DIGITS"):
        build_dataset(True, _args(data_set=name))


@pytest.mark.parametrize("data_set,folder", [("CIFAR10", "cifar-10-batches-py/"),
                                             ("CIFAR100", "cifar-100-python/"),
                                             ("CIFAR", "cifar-10-batches-py/")])
def test_cifar_never_downloads(tmp_path: Path, data_set: str, folder: str) -> None:
    with pytest.raises(UserError, match="--data-path") as info:
        build_dataset(True, _args(data_set=data_set, data_path=str(tmp_path)))
    assert folder in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_size() -> None:
    with pytest.raises(UserError, match="--input-size"):
        build_transform(False, _args(input_size=0))


def test_bad_eval_crop_ratio() -> None:
    with pytest.raises(UserError, match="--eval-crop-ratio"):
        build_transform(False, _args(input_size=224, eval_crop_ratio=1.5))


# --------------------------------------------------------------------------- transforms


def test_train_transform_small_inputs_use_random_crop() -> None:
    tf = build_transform(True, _args(input_size=32))
    assert "RandomCrop" in repr(tf.transforms[0])
    assert "RandomResized" not in repr(tf.transforms[0])
    tf = build_transform(True, _args(input_size=64))
    assert "RandomResizedCrop" in type(tf.transforms[0]).__name__


@pytest.mark.parametrize("aa", ["none", "", None])
def test_no_auto_augment(aa) -> None:
    tf = build_transform(True, _args(input_size=64, aa=aa))
    assert "RandAugment" not in repr(tf)


def test_eval_transform_resize_then_crop() -> None:
    tf = build_transform(False, _args(input_size=224))
    assert tf.transforms[0].size == 256
    tf = build_transform(False, _args(input_size=224, eval_crop_ratio=1.0))
    assert tf.transforms[0].size == 224
    out = tf(Image.new("RGB", (300, 250)))
    assert out.shape == (3, 224, 224)


# --------------------------------------------------------------------------- iNaturalist


def _write_inat(root: Path, year: int = 2018) -> None:
    cats = [
        {"id": 0, "name": "a", "genus": "g1", "supercategory": "Plantae", "kingdom": "K"},
        {"id": 1, "name": "b", "genus": "g1", "supercategory": "Plantae", "kingdom": "K"},
        {"id": 2, "name": "c", "genus": "g2", "supercategory": "Aves", "kingdom": "K"},
    ]
    rng = np.random.default_rng(1)
    for split, ids in (("train", [0, 1, 2, 0]), ("val", [2, 1])):
        images, anns = [], []
        for k, cat in enumerate(ids):
            rel = f"train_val{year}/{cats[cat]['supercategory']}/{cat}/{split}{k}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(path)  # gray
            images.append({"id": k, "file_name": rel})
            anns.append({"image_id": k, "category_id": cat})
        (root / f"{split}{year}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.parametrize("category,n_classes", [("name", 3), ("genus", 2), ("kingdom", 1)])
def test_inat(tmp_path: Path, category: str, n_classes: int) -> None:
    _write_inat(tmp_path)
    args = _args(data_set="INAT", data_path=str(tmp_path), inat_category=category)
    train, n = build_dataset(True, args)
    val, n_val = build_dataset(False, args)
    assert n == n_val == n_classes
    assert len(train) == 4 and len(val) == 2
    _check_sample(val, 32, n)
    if category == "name":
        assert train.targets == [0, 1, 2, 0] and val.targets == [2, 1]


def test_inat_errors(tmp_path: Path) -> None:
    args = _args(data_set="INAT19", data_path=str(tmp_path))
    with pytest.raises(UserError, match=r"--data-path.*train2019\.json"):
        build_dataset(True, args)
    _write_inat(tmp_path, year=2019)
    with pytest.raises(UserError, match="--inat-category"):
        build_dataset(True, _args(data_set="INAT19", data_path=str(tmp_path),
                                  inat_category="species"))
    with pytest.raises(UserError, match="--inat-category"):
        build_dataset(True, _args(data_set="INAT19", data_path=str(tmp_path),
                                  inat_category="family"))  # field absent from the table


def test_minimal_namespace_uses_deit_defaults() -> None:
    tf = build_transform(True, Namespace(input_size=64))
    text = repr(tf)
    assert "RandAugment" in text and "RandomErasing(p=0.25, mode=pixel" in text


def test_randaugment_posterize_to_zero_bits_works():
    """DeiT's default --aa (RandAugment 'inc') can ask timm to posterize to 0 bits, which
    Pillow 13 refuses; requirements.txt pins Pillow below 13 for that reason."""
    from timm.data.auto_augment import posterize

    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert np.asarray(posterize(img, 0)).max() == 0


def test_hflip_flag_controls_flipping():
    def tf(h):
        return build_transform(True, Namespace(input_size=32, aa="none", reprob=0.0,
                                               color_jitter=0.0, hflip=h))
    assert any("HorizontalFlip" in repr(t) for t in tf(0.5).transforms)
    assert not any("HorizontalFlip" in repr(t) for t in tf(0.0).transforms)
