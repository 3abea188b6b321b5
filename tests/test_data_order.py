"""Sample order: each epoch a permutation; ranks x workers partition the stream; pure in (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest

from maskdm.pipeline.data.order import StreamOrder, rank_positions

SHARDINGS = [(10,), (7, 5, 13, 1), (4, 4, 4, 4, 4, 4), (3, 9, 2, 11, 6)]


@pytest.mark.parametrize("sizes", SHARDINGS)
@pytest.mark.parametrize("seed", range(5))
def test_each_epoch_is_a_permutation(sizes, seed):
    order = StreamOrder(sizes, seed)
    n = sum(sizes)
    for epoch in range(3):
        ids = order.epoch(epoch)
        assert np.array_equal(np.sort(ids), np.arange(n))


@pytest.mark.parametrize("sizes", SHARDINGS)
def test_same_seed_same_order_and_epochs_differ(sizes):
    a, b = StreamOrder(sizes, 1), StreamOrder(sizes, 1)
    assert np.array_equal(a.epoch(4), b.epoch(4))
    assert not np.array_equal(a.epoch(0), a.epoch(1))
    assert not np.array_equal(a.epoch(0), StreamOrder(sizes, 2).epoch(0))


def test_shuffle_is_bounded_to_one_shard_at_a_time():
    sizes = (5, 5, 5, 5)
    order = StreamOrder(sizes, 0)
    shard, _ = order.locate(order.epoch(0))
    runs = [shard[i] for i in range(len(shard)) if i == 0 or shard[i] != shard[i - 1]]
    assert sorted(runs) == [0, 1, 2, 3]  # each shard visited in one contiguous run


def test_positions_map_across_epochs():
    order = StreamOrder((3, 4), 9)
    pos = np.arange(0, 21)
    ids = order.ids_at(pos)
    for e in range(3):
        assert np.array_equal(ids[7 * e:7 * (e + 1)], order.epoch(e))


@pytest.mark.parametrize("sizes", SHARDINGS)
@pytest.mark.parametrize("world,workers,local", [(1, 1, 4), (2, 1, 3), (3, 2, 2), (4, 3, 1),
                                                 (2, 4, 5)])
def test_ranks_and_workers_partition_the_stream(sizes, world, workers, local):
    """Every stream position goes to exactly one (rank, worker); equal batches per rank."""
    global_batch = world * local
    n = sum(sizes)
    batches_per_rank = -(-2 * n // global_batch) + 1  # a bit over two epochs
    owner = {}
    for rank in range(world):
        for worker in range(workers):
            for k in range(worker, batches_per_rank, workers):  # the DataLoader's round robin
                for p in rank_positions(0, k, global_batch, rank, world):
                    assert p not in owner, f"position {p} consumed twice"
                    owner[int(p)] = (rank, worker)
    covered = sorted(owner)
    assert covered == list(range(batches_per_rank * global_batch))  # no gap, no overlap
    order = StreamOrder(sizes, 0)
    ids = order.ids_at(np.array(covered))
    for e in range(2):  # the first two epochs are each consumed exactly once
        assert np.array_equal(np.sort(ids[e * n:(e + 1) * n]), np.arange(n))


def test_start_offset_continues_the_same_stream():
    a = rank_positions(0, 5, 8, 1, 2)
    b = rank_positions(8 * 3, 2, 8, 1, 2)
    assert np.array_equal(a, b)


def test_flips_are_deterministic_and_balanced():
    order = StreamOrder((100,), 0)
    f = order.flips(np.arange(10000))
    assert np.array_equal(f, StreamOrder((100,), 0).flips(np.arange(10000)))
    assert 0.45 < f.mean() < 0.55
    assert not np.array_equal(f, StreamOrder((100,), 1).flips(np.arange(10000)))


def test_one_hash_for_every_stream():
    """``mix`` is one function for scalars and arrays; full 64-bit seeds are used (no
    truncation to 32 bits); flip coins are fair and differ between seeds."""
    from maskdm.pipeline.randomness import flip_coins, mix

    xs = np.arange(1000, dtype=np.uint64)
    assert [mix(7, 3, int(x)) for x in xs[:50]] == mix(7, 3, xs)[:50].tolist()
    assert mix(1, 2) != mix(2, 1)
    big = 2**32 + 5
    assert not np.array_equal(StreamOrder([50, 50], 5).epoch(0), StreamOrder([50, 50], big).epoch(0))
    coins = flip_coins(0, np.arange(20000))
    assert abs(coins.mean() - 0.5) < 0.02
    assert 0.45 < (coins == flip_coins(1, np.arange(20000))).mean() < 0.55
