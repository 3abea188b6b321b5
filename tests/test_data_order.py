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


# ---------------------------------------------------------------------- partitions and windows
from maskdm.pipeline.data.order import (OrderError, auto_partitions, batch_diversity,  # noqa: E402
                                        uniform_diversity)

PARTITIONED = [((40,) * 16, 4, 3, 16), ((7, 5, 13, 1, 9, 9, 2), 3, 2, 6), ((25,) * 5, 8, 1, 16),
               ((100, 100, 37), 2, 8, 4)]


def test_one_partition_and_a_window_of_one_is_the_order_before_partitions():
    """Pinned from maskdm 0.2 (StreamOrder((7, 5, 13, 1), 3)): old checkpoints resume exactly."""
    order = StreamOrder((7, 5, 13, 1), 3)
    assert order.ids_at(np.arange(20, 40)).tolist() == [
        10, 7, 8, 9, 11, 25, 23, 14, 13, 17, 21, 15, 18, 22, 19, 20, 16, 24, 12, 6]


@pytest.mark.parametrize("sizes,partitions,window,batch", PARTITIONED)
def test_partitions_deal_every_sample_once_in_near_equal_parts(sizes, partitions, window, batch):
    order = StreamOrder(sizes, 1, partitions=partitions, window=window, global_batch=batch)
    n = sum(sizes)
    seen = np.concatenate([order.partition_epoch(p, 0) for p in range(partitions)])
    assert np.array_equal(np.sort(seen), np.arange(n))  # disjoint, and together everything
    assert max(order.partition_sizes) - min(order.partition_sizes) <= 1
    for p in range(partitions):  # every partition-epoch is a permutation of the partition
        for e in (1, 2):
            assert np.array_equal(np.sort(order.partition_epoch(p, e)),
                                  np.sort(order.partition_epoch(p, 0)))
    assert not np.array_equal(order.partition_epoch(0, 0), order.partition_epoch(0, 1))


@pytest.mark.parametrize("sizes,partitions,window,batch", PARTITIONED)
def test_a_window_holds_at_most_window_shards_and_a_shard_is_read_in_one_window(
        sizes, partitions, window, batch):
    order = StreamOrder(sizes, 2, partitions=partitions, window=window, global_batch=batch)
    for p in range(partitions):
        ids, ends, shards = order._partition_epoch(p, 0)
        where = {}
        for w, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
            s = order.locate(ids[lo:hi])[0]
            assert len(set(s.tolist())) <= window
            assert list(dict.fromkeys(s.tolist())) == shards[w]  # first-needed order
            for x in set(s.tolist()):
                assert where.setdefault(x, w) == w  # a shard's piece is not split over windows


@pytest.mark.parametrize("sizes,partitions,window,batch", PARTITIONED)
def test_every_batch_takes_equal_slices_of_every_partition_whatever_the_world_size(
        sizes, partitions, window, batch):
    order = StreamOrder(sizes, 3, partitions=partitions, window=window, global_batch=batch)
    part = np.empty(sum(sizes), dtype=np.int64)
    for p in range(partitions):
        part[order.partition_epoch(p, 0)] = p
    b = batch // partitions
    for g in range(7):
        ids = order.ids_at(np.arange(g * batch, (g + 1) * batch))
        assert part[ids].tolist() == [p for p in range(partitions) for _ in range(b)]
    for world in [w for w in range(1, batch + 1) if batch % w == 0]:
        for rank in range(world):
            mine = order.rank_partitions(rank, world)
            ids = order.ids_at(rank_positions(0, 3, batch, rank, world))
            assert set(part[ids].tolist()) == set(mine)
            if partitions % world == 0:  # whole partitions: only their shards are read
                assert len(mine) == partitions // world
                assert set(order.locate(ids)[0].tolist()) <= order.shards_of(mine)


def test_with_equal_partitions_every_epoch_of_global_batches_is_a_permutation():
    order = StreamOrder((40,) * 16, 0, partitions=4, window=3, global_batch=16)
    for e in range(3):
        ids = order.ids_at(np.arange(e * 640, (e + 1) * 640))
        assert np.array_equal(np.sort(ids), np.arange(640))


def test_the_order_is_pure_in_its_settings():
    kw = dict(partitions=4, window=2, global_batch=8)
    a = StreamOrder((40,) * 16, 7, **kw).ids_at(np.arange(500))
    assert np.array_equal(a, StreamOrder((40,) * 16, 7, **kw).ids_at(np.arange(500)))
    for other in (dict(kw, window=3), dict(kw, partitions=2), dict(kw, global_batch=16)):
        assert not np.array_equal(a, StreamOrder((40,) * 16, 7, **other).ids_at(np.arange(500)))
    assert not np.array_equal(a, StreamOrder((40,) * 16, 8, **kw).ids_at(np.arange(500)))


def test_sorted_shards_are_mixed_at_the_default_settings():
    """The done-when figure: 16 shards of 40 written in sorted order, global batch 16: a batch
    mixes at least 60% as many shards as a uniform random draw (measured: 16 of 16, 154%); the
    order of 0.2 mixed 1.4."""
    from maskdm.pipeline.data.order import DEFAULT_WINDOW
    sizes = (40,) * 16
    uniform = uniform_diversity(sizes, 16)
    assert 10.2 < uniform < 10.6  # 16 * (1 - (C(600,16) / C(640,16)))
    order = StreamOrder(sizes, 0, partitions=auto_partitions(16, 16), window=DEFAULT_WINDOW,
                        global_batch=16)
    assert batch_diversity(order, 40).mean() >= 0.6 * uniform
    assert batch_diversity(StreamOrder(sizes, 0, global_batch=16), 40).mean() < 2.0
    # larger: 100 shards of 1000, global batch 128, 16 partitions: the window decides
    big = (1000,) * 100
    u = uniform_diversity(big, 128)
    mixes = {w: batch_diversity(StreamOrder(big, 0, partitions=16, window=w, global_batch=128),
                                50).mean() / u for w in (1, 8)}
    assert mixes[1] < 0.3 and mixes[8] > 0.9


def test_auto_partitions():
    assert auto_partitions(100, 128) == 16
    assert auto_partitions(3, 8) == 2
    assert auto_partitions(1, 8) == 1
    assert auto_partitions(100, 24) == 8
    assert auto_partitions(100, 6) == 2
    assert auto_partitions(5, 16) == 4


def test_order_settings_that_cannot_work_are_refused_with_the_setting_named():
    with pytest.raises(OrderError, match="data.partitions=3 must divide the global batch"):
        StreamOrder((10,) * 4, 0, partitions=3, global_batch=8)
    with pytest.raises(OrderError, match="only 7 samples"):
        StreamOrder((7,), 0, partitions=8, global_batch=8)
    with pytest.raises(OrderError, match="shuffle_window"):
        StreamOrder((7,), 0, window=0)


def test_needed_shards_are_the_window_then_the_lookahead():
    order = StreamOrder((10,) * 12, 0, partitions=2, window=2, global_batch=4)
    for p in range(2):
        ids, ends, shards = order._partition_epoch(p, 0)
        cur, ahead = order.needed(p, 0, 3)
        assert cur == shards[0] and ahead == (shards[1] + shards[2])[:3]
        cur, ahead = order.needed(p, int(ends[-1]) - 1, 2)  # the last window: into the next epoch
        nxt = [s for w in order._partition_epoch(p, 1)[2] for s in w if s not in cur]
        assert cur == shards[-1] and ahead == list(dict.fromkeys(nxt))[:2]
    legacy = StreamOrder((5, 5, 5, 5), 0)  # one partition, window 1: the shard and the next two
    seq = list(dict.fromkeys(legacy.locate(legacy.epoch(0))[0].tolist()))
    assert legacy.needed(0, 7, 2) == ([seq[1]], seq[2:4])


def test_a_detour_leaves_every_window_of_the_batch():
    order = StreamOrder((10,) * 40, 0, partitions=4, window=2, global_batch=8)
    pos = rank_positions(0, 5, 8, 0, 1)
    here = set(order.locate(order.ids_at(pos))[0].tolist())
    there = set(order.locate(order.ids_at(order.detour(pos, 1)))[0].tolist())
    assert not here & there
