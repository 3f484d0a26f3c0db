"""Repeated-augmentation sampling (Hoffer et al., 2019), as used by DeiT.

Each image is drawn several times per epoch, and the copies land on different ranks, so
one optimizer step sees several augmentations of the same image. The epoch is cut to about
one pass over the dataset, keeping epochs comparable to ordinary sampling.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Optional, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class RASampler(Sampler[int]):
    """Distributed sampler that repeats every index `num_repeats` times per epoch.

    The shuffled order is repeated element-wise (a, a, a, b, b, b, ...), padded to a
    multiple of the world size and dealt out round-robin, so consecutive copies of one
    index go to different ranks. Each rank then keeps only its first
    `len(dataset) // 256 * 256 / num_replicas` indices, DeiT's epoch length.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        shuffle: bool = True,
        num_repeats: int = 3,
        seed: int = 0,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0

        n = len(dataset)
        # Untruncated share of the repeated list per rank (after padding).
        self.num_samples = math.ceil(n * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        # DeiT's epoch length; tiny sets (< 256 items) would get 0, so fall back to one pass.
        selected = int(math.floor(n // 256 * 256 / num_replicas))
        if selected == 0:
            selected = math.ceil(n / num_replicas)
        self.num_selected_samples = min(selected, self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle: call once per epoch before iterating, on every rank."""
        self.epoch = epoch

    def _repeated_order(self) -> torch.Tensor:
        """The full repeated and padded index list for this epoch, shared by all ranks."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order.repeat_interleave(self.num_repeats)
        pad = self.total_size - order.numel()
        if pad > 0:
            # pad can exceed n only when n is tiny; tile to be safe.
            order = torch.cat([order, order.repeat(math.ceil(pad / max(n, 1)))[:pad]])
        return order

    def _rank_indices_untruncated(self) -> list[int]:
        """This rank's interleaved shard before cutting to the epoch length."""
        return self._repeated_order()[self.rank:self.total_size:self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices_untruncated()[: self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shards for --dist-eval: rank r takes items r, r+W, ... with no padding,
    so summing counts over ranks scores every image exactly once."""

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A distinct, reproducible seed per (epoch, rank, position in the epoch)."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729 + position * 2_654_435_761) % 2**63


class SeededSampler(Sampler):
    """Wraps a sampler to yield (index, seed) pairs, optionally starting mid-epoch.

    Paired with `SeededDataset`, each sample's augmentation is a function of its position in
    the epoch only, not of which worker loads it or what ran before: a run resumed at
    iteration k sees exactly the images and augmentations an uninterrupted run saw.
    """

    def __init__(self, base: Sampler, seed: int, rank: int = 0) -> None:
        self.base, self.seed, self.rank = base, seed, rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; `skip` drops the epoch's first items (resuming mid-epoch)."""
        self.epoch, self.skip = epoch, skip
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        for position, index in enumerate(self.base):
            if position >= self.skip:
                yield index, sample_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class SeededDataset(torch.utils.data.Dataset):
    """Seeds torch, numpy and random from the sampler's seed before loading one sample."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]
