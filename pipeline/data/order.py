"""Sample order: a pure function of (shard sizes, seed, partitions, window, global batch).

**Partitions.** The usable shards are dealt once, for the whole run, to ``P`` partitions: the shards
in a seeded random order, cut into ``P`` runs of (almost) equal sample counts, so partition ``p``
holds the samples ``[p*N//P, (p+1)*N//P)`` of that concatenation (a shard cut by a boundary lends
its first samples to one partition and the rest to the next). Each partition is its own endless
stream of partition-epochs. Global batch ``g`` (``G`` samples) is ``b = G/P`` consecutive samples
of every partition, partition-major: slot ``i`` of the batch is sample ``g*b + i % b`` of partition
``i // b``. Rank ``r`` of ``W`` takes the slots ``[r*G/W, (r+1)*G/W)`` (``rank_positions``), so a
rank count that divides ``P`` gives each rank whole partitions, and a node reads only the shards of
its ranks' partitions. The order depends on ``G`` but never on ``W``: a run resumed on another
number of ranks sees the same samples at every step.

**Window.** A partition-epoch visits the partition's pieces (whole shards, or the part of a cut
shard) in a seeded random order, ``w`` pieces at a time: the samples of a window of ``w`` pieces are
shuffled together, then the next window starts. At most ``w`` shards of a partition are being read
at any time (plus what is downloaded ahead), and a partition's ``b`` samples of a batch come from up
to ``w`` shards, so a global batch mixes up to ``P*w`` shards even when the shards were written in
sorted order.

``partitions=1, window=1`` is the order of maskdm before 0.3 (each epoch: the shards in a seeded
order, each shard's samples shuffled, shard after shard), reproduced draw for draw, so a checkpoint
written then continues with the same samples. Sample ids are ``offset[shard] + j`` with ``j`` the
sample's position in its shard; stream positions are global (``samples_seen``).
"""

from __future__ import annotations

from collections import OrderedDict
from math import exp, lgamma

import numpy as np

from ..randomness import deal_rng, epoch_rng, flip_coins, partition_rng

MAX_AUTO_PARTITIONS = 16
DEFAULT_WINDOW = 8


class OrderError(ValueError):
    """The order cannot be built with these settings; the message names the setting."""


def auto_partitions(num_shards: int, global_batch: int, cap: int = MAX_AUTO_PARTITIONS) -> int:
    """``data.partitions: null``: the largest power of two that is at most ``cap`` and the number
    of usable shards and divides the (micro) global batch. Recorded in the checkpoint, so a resume
    never re-derives it."""
    p = 1
    while p * 2 <= min(cap, num_shards) and global_batch % (p * 2) == 0:
        p *= 2
    return p


class StreamOrder:
    def __init__(self, shard_sizes: list[int] | tuple[int, ...], seed: int, *,
                 partitions: int = 1, window: int = 1, global_batch: int | None = None):
        sizes = tuple(int(s) for s in shard_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError("every shard must hold at least one sample")
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self.seed = int(seed)
        self.partitions, self.window = int(partitions), int(window)
        if self.window < 1:
            raise OrderError(f"data.shuffle_window must be >= 1 shard, got {self.window}")
        if self.partitions < 1:
            raise OrderError(f"data.partitions must be >= 1, got {self.partitions}")
        if self.partitions > self.num_samples:
            raise OrderError(f"data.partitions={self.partitions} but the dataset has only "
                             f"{self.num_samples} samples: use at most that many partitions")
        if self.partitions > 1:
            if global_batch is None or global_batch % self.partitions:
                raise OrderError(f"data.partitions={self.partitions} must divide the global batch "
                                 f"per micro-step ({global_batch}): every batch takes the same "
                                 f"number of samples from each partition")
        self.global_batch = int(global_batch) if global_batch is not None else None
        self.per_partition = self.global_batch // self.partitions if self.partitions > 1 else None
        self.pieces = self._deal()
        self.partition_sizes = [sum(hi - lo for _, lo, hi in ps) for ps in self.pieces]
        self._epochs: OrderedDict[tuple[int, int], tuple] = OrderedDict()

    def __getstate__(self):  # DataLoader workers: recompute the epochs they need
        state = dict(self.__dict__)
        state["_epochs"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ dealing
    def _deal(self) -> list[list[tuple[int, int, int]]]:
        """Per partition, its pieces ``(shard, first j, end j)``; fixed for the run."""
        if self.partitions == 1:
            return [[(s, 0, n) for s, n in enumerate(self.sizes)]]
        perm = deal_rng(self.seed).permutation(len(self.sizes))
        bounds = [p * self.num_samples // self.partitions for p in range(self.partitions + 1)]
        out: list[list[tuple[int, int, int]]] = [[] for _ in range(self.partitions)]
        at, p = 0, 0  # ``at``: samples of the concatenation before the current shard
        for s in perm.tolist():
            lo = 0
            while lo < self.sizes[s]:
                while at + lo >= bounds[p + 1]:
                    p += 1
                hi = min(self.sizes[s], bounds[p + 1] - at)
                out[p].append((s, lo, hi))
                lo = hi
            at += self.sizes[s]
        return out

    def shards_of(self, partitions) -> set[int]:
        """The shards holding samples of ``partitions``."""
        return {s for p in partitions for s, _, _ in self.pieces[p]}

    # ------------------------------------------------------------------ partition-epochs
    def _partition_epoch(self, p: int, epoch: int):
        """(ids in visiting order, window ends (cumulative sample counts), shards of each window
        in the order they are first needed) of partition ``p``'s epoch ``epoch``."""
        key = (p, epoch)
        if key in self._epochs:
            self._epochs.move_to_end(key)
            return self._epochs[key]
        # one partition: the generator of the pre-0.3 order, so that order is reproduced exactly
        rng = epoch_rng(self.seed, epoch) if self.partitions == 1 else \
            partition_rng(self.seed, epoch, p)
        pieces = self.pieces[p]
        visit = rng.permutation(len(pieces))
        parts, ends, shards, n = [], [], [], 0
        for w0 in range(0, len(visit), self.window):
            ids = np.concatenate([self.offsets[pieces[k][0]] + np.arange(pieces[k][1], pieces[k][2])
                                  for k in visit[w0:w0 + self.window]])
            ids = ids[rng.permutation(len(ids))]
            parts.append(ids)
            n += len(ids)
            ends.append(n)
            first = self.locate(ids)[0]
            shards.append(list(dict.fromkeys(first.tolist())))
        order = np.concatenate(parts)
        order.setflags(write=False)
        entry = (order, np.asarray(ends, dtype=np.int64), shards)
        self._epochs[key] = entry
        while len(self._epochs) > 3 * self.partitions + 2:
            self._epochs.popitem(last=False)
        return entry

    def partition_epoch(self, p: int, epoch: int) -> np.ndarray:
        """Sample ids of partition ``p``'s epoch ``epoch`` in visiting order (a permutation of the
        partition's samples)."""
        return self._partition_epoch(p, epoch)[0]

    def epoch(self, epoch: int) -> np.ndarray:
        """One partition: the sample ids of ``epoch`` in visiting order (a permutation of
        range(num_samples)). With several partitions there is no such global permutation."""
        if self.partitions != 1:
            raise ValueError("epoch() is defined for one partition; use partition_epoch()")
        return self.partition_epoch(0, epoch)

    # ------------------------------------------------------------------ positions
    def split(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions -> (partition, position in the partition's stream)."""
        q = np.asarray(positions, dtype=np.int64)
        if self.partitions == 1:
            return np.zeros_like(q), q
        g, i = np.divmod(q, self.global_batch)
        b = self.per_partition
        return i // b, g * b + i % b

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Stream positions -> sample ids."""
        part, t = self.split(positions)
        out = np.empty_like(t)
        for p in np.unique(part).tolist():
            sel = part == p
            n = self.partition_sizes[p]
            epochs, within = np.divmod(t[sel], n)
            ids = np.empty(len(epochs), dtype=np.int64)
            for e in np.unique(epochs).tolist():
                here = epochs == e
                ids[here] = self.partition_epoch(p, e)[within[here]]
            out[sel] = ids
        return out

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids -> (shard index, position in shard)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def detour(self, positions: np.ndarray, m: int) -> np.ndarray:
        """Where to take a batch from when every sample at ``positions`` is damaged: ``m`` strides
        further along the stream, a stride moving every partition past a whole window (so into
        other shards). ``m = 0`` gives ``positions`` themselves."""
        span = self.window * max(self.sizes)
        if self.partitions == 1:
            stride = span
        else:
            stride = -(-span // self.per_partition) * self.global_batch
        return np.asarray(positions, dtype=np.int64) + m * stride

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """Deterministic coin per stream position (horizontal-flip augmentation)."""
        return flip_coins(self.seed, positions)

    # ------------------------------------------------------------------ who reads what
    def rank_partitions(self, rank: int, world_size: int) -> list[int]:
        """The partitions whose samples rank ``rank`` of ``world_size`` reads."""
        if self.partitions == 1:
            return [0]
        local = self.global_batch // world_size
        lo, hi = rank * local, (rank + 1) * local
        return list(range(lo // self.per_partition, (hi - 1) // self.per_partition + 1))

    def ranks_partitions(self, ranks, world_size: int) -> list[int]:
        """The partitions a group of ranks (a node) reads, sorted."""
        return sorted({p for r in ranks for p in self.rank_partitions(r, world_size)})

    def needed_at(self, partitions, position: int, lookahead: int) -> list[int]:
        """The shards ``partitions`` need from stream ``position`` on, in the order to fetch them:
        every partition's current window, then their lookahead shards taken in turn."""
        per = [self.needed(p, self.batch_start(position, p), lookahead) for p in partitions]
        out = [s for current, _ in per for s in current]
        out += [a[k] for k in range(lookahead) for _, a in per if k < len(a)]
        return list(dict.fromkeys(int(s) for s in out))

    def needed(self, p: int, t: int, lookahead: int) -> tuple[list[int], list[int]]:
        """Shards of partition ``p`` needed from its stream position ``t`` on: (those of the window
        being read, up to ``lookahead`` more in the order they will be needed)."""
        n = self.partition_sizes[p]
        epoch, within = divmod(int(t), n)
        _, ends, shards = self._partition_epoch(p, epoch)
        w = int(np.searchsorted(ends, within, side="right"))
        out = list(shards[w])
        current = len(out)
        seen = set(out)
        while len(out) < current + lookahead:
            w += 1
            if w == len(shards):
                epoch, w = epoch + 1, 0
                _, _, shards = self._partition_epoch(p, epoch)
                if epoch > int(t) // n + 2:  # a partition of fewer shards than the lookahead
                    break
            for s in shards[w]:
                if s not in seen and len(out) < current + lookahead:
                    seen.add(s)
                    out.append(s)
        return out[:current], out[current:]

    def batch_start(self, position: int, p: int) -> int:
        """Partition ``p``'s stream position at the global batch holding stream ``position``."""
        if self.partitions == 1:
            return int(position)
        return int(position) // self.global_batch * self.per_partition

    def state(self) -> dict:
        return {"partitions": self.partitions, "window": self.window}


def rank_positions(start: int, batch_index: int, global_batch: int, rank: int,
                   world_size: int) -> np.ndarray:
    """Stream positions of the rank's ``batch_index``-th batch after position ``start``."""
    local = global_batch // world_size
    lo = start + batch_index * global_batch + rank * local
    return np.arange(lo, lo + local, dtype=np.int64)


def batch_diversity(order: StreamOrder, batches: int, start: int = 0) -> np.ndarray:
    """Distinct shards in each of ``batches`` global batches from stream position ``start``."""
    g = order.global_batch
    shards = order.locate(order.ids_at(np.arange(start, start + batches * g)))[0]
    return np.array([len(np.unique(shards[k * g:(k + 1) * g])) for k in range(batches)])


def uniform_diversity(sizes, global_batch: int) -> float:
    """Expected distinct shards in ``global_batch`` samples drawn uniformly without replacement
    from shards of ``sizes`` (the yardstick of a perfectly shuffled dataset)."""
    n = sum(sizes)

    def p_none(s):  # P(no sample of a shard of size s among the draw)
        if n - s < global_batch:
            return 0.0
        return exp(lgamma(n - s + 1) - lgamma(n - s - global_batch + 1)
                   - lgamma(n + 1) + lgamma(n - global_batch + 1))
    return sum(1.0 - p_none(s) for s in sizes)
