"""Study 5: the real image sets (CIFAR-10 subset, scikit-learn's DIGITS) as tensors, and the
augmentation the study trains with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (ROOT)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DIGITS_MEAN, DIGITS_STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    """Normalised float images in memory: no loader workers, fast on 2 cores."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    name: str


def _normalise(x: np.ndarray, mean, std) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((t - m) / s).contiguous()


def cifar_dir() -> Path:
    return ROOT.parent / "shared" / "data" / "cifar10"


def load_data(kind: str, img_size: int, train_subset: int | None) -> Data:
    if kind == "cifar10":
        d = cifar_dir()
        tr = np.load(d / "cifar10_train20k.npz")
        va = np.load(d / "cifar10_test10k.npz")
        xt, yt, xv, yv = tr["x_train"], tr["y_train"], va["x_val"], va["y_val"]
        mean, std = CIFAR_MEAN, CIFAR_STD
    else:
        from datasets import _digits_split
        images, targets, tri, vai = _digits_split()
        rgb = np.repeat(images[..., None], 3, axis=-1)  # 8x8 gray -> RGB
        xt, yt, xv, yv = rgb[tri], targets[tri], rgb[vai], targets[vai]
        mean, std = DIGITS_MEAN, DIGITS_STD
    if train_subset:
        xt, yt = xt[:train_subset], yt[:train_subset]
    x_train, x_val = _normalise(xt, mean, std), _normalise(xv, mean, std)
    if x_train.shape[-1] != img_size:
        x_train = F.interpolate(x_train, size=img_size, mode="bilinear", align_corners=False)
        x_val = F.interpolate(x_val, size=img_size, mode="bilinear", align_corners=False)
    return Data(x_train, torch.as_tensor(yt, dtype=torch.long), x_val,
                torch.as_tensor(yv, dtype=torch.long), kind)


def augment(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (zero = the mean after normalising) and horizontal flip."""
    n, _, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        x = torch.stack([xp[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x
