"""RASampler: shard sizes, disjointness, repeat counts and epoch/seed determinism."""

from __future__ import annotations

from collections import Counter

import pytest

from samplers import RASampler


def _samplers(n: int, world: int, **kw) -> list[RASampler]:
    return [RASampler(range(n), num_replicas=world, rank=r, **kw) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lengths_equal_and_follow_deit(world: int) -> None:
    samplers = _samplers(1000, world)
    lengths = {len(s) for s in samplers}
    assert lengths == {1000 // 256 * 256 // world}
    assert all(len(list(s)) == len(s) for s in samplers)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_truncated_shards_disjoint_and_bounded(world: int) -> None:
    samplers = _samplers(1000, world, num_repeats=3)
    # Position-disjoint: rank r holds positions r, r+world, ... of the shared list.
    order = samplers[0]._repeated_order().tolist()
    union: list[int] = []
    for r, s in enumerate(samplers):
        got = list(s)
        assert got == order[r::world][: len(s)]
        union += got
    counts = Counter(union)
    assert max(counts.values()) <= 3
    assert all(0 <= i < 1000 for i in counts)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1000, 512, 7])
def test_untruncated_union_is_full_repeated_list(world: int, n: int) -> None:
    samplers = _samplers(n, world, num_repeats=3)
    shards = [s._rank_indices_untruncated() for s in samplers]
    assert len({len(x) for x in shards}) == 1
    union = Counter(i for shard in shards for i in shard)
    full = Counter(samplers[0]._repeated_order().tolist())
    assert union == full
    pad = samplers[0].total_size - 3 * n
    assert 0 <= pad < world
    # Every index at least num_repeats times; only padding adds extra copies.
    assert set(union) == set(range(n))
    assert all(c >= 3 for c in union.values())
    assert sum(union.values()) == 3 * n + pad


@pytest.mark.parametrize("world", [2, 4])
def test_no_repeat_no_truncation_covers_everything(world: int) -> None:
    samplers = _samplers(512, world, num_repeats=1)
    union = [i for s in samplers for i in s]
    assert sorted(union) == list(range(512))


def test_copies_of_an_index_go_to_different_ranks() -> None:
    samplers = _samplers(999, 3, num_repeats=3)
    shards = [set(s._rank_indices_untruncated()) for s in samplers]
    # With world == num_repeats and no padding, each rank gets each index exactly once.
    assert all(shard == set(range(999)) for shard in shards)


def test_epochs_and_seeds() -> None:
    a = RASampler(range(1000), num_replicas=2, rank=0, seed=5)
    b = RASampler(range(1000), num_replicas=2, rank=0, seed=5)
    c = RASampler(range(1000), num_replicas=2, rank=0, seed=6)
    first = list(a)
    assert first == list(a)  # same epoch, same order
    assert first == list(b)  # same seed, same order
    assert first != list(c)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first


def test_no_shuffle_is_sequential() -> None:
    s = RASampler(range(10), num_replicas=1, rank=0, shuffle=False, num_repeats=2)
    assert s._rank_indices_untruncated() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                             8, 8, 9, 9]
    assert list(s) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_tiny_dataset_fallback() -> None:
    samplers = _samplers(10, 3)
    assert [len(s) for s in samplers] == [4, 4, 4]
    assert all(len(list(s)) == 4 for s in samplers)


def test_defaults_without_distributed() -> None:
    s = RASampler(range(300))
    assert (s.num_replicas, s.rank) == (1, 0)
    assert len(s) == 256


def test_bad_rank_rejected() -> None:
    with pytest.raises(ValueError):
        RASampler(range(10), num_replicas=2, rank=2)
