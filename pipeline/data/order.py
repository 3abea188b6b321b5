"""Sample order as a pure function of (shard sizes, seed, epoch), and its split over consumers.

The training stream is the concatenation of epochs; epoch ``e`` visits every sample once: shards
in a seeded random order, the samples of each shard in a seeded random order (a shuffle buffer of
one shard; shards are i.i.d. because ``maskdm shard`` shuffles inputs before cutting them).
Global batch ``g`` is stream positions ``[g*G, (g+1)*G)``; rank ``r`` of ``W`` takes the slice
``[r*G/W, (r+1)*G/W)`` of it, and DataLoader worker ``w`` of ``n`` produces the rank's batches
``k = w (mod n)``. Every rank therefore gets the same number of equal batches, whatever the shard
counts: a batch may straddle an epoch boundary (the remainder of an epoch is the start of the next
global batch), so nothing is dropped and nothing is padded. Sample ids are ``offset[shard] + j``
with ``j`` the sample's position in its shard.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..randomness import epoch_rng, flip_coins


class StreamOrder:
    def __init__(self, shard_sizes: list[int] | tuple[int, ...], seed: int):
        sizes = tuple(int(s) for s in shard_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError("every shard must hold at least one sample")
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self.seed = int(seed)

    def epoch(self, epoch: int) -> np.ndarray:
        """Sample ids of ``epoch`` in visiting order: a permutation of range(num_samples)."""
        return _epoch_order(self.sizes, self.seed, int(epoch))

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Stream positions -> sample ids."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // self.num_samples
        within = positions % self.num_samples
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch(int(e))[within[sel]]
        return out

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids -> (shard index, position in shard)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def detour(self, positions: np.ndarray, m: int) -> np.ndarray:
        """Where to take a batch from when every sample at ``positions`` is damaged: ``m`` times the
        largest shard further along the stream, which lies in another shard (a shard's samples
        are consecutive within an epoch). ``m = 0`` gives ``positions`` themselves."""
        return np.asarray(positions, dtype=np.int64) + m * max(self.sizes)

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """Deterministic coin per stream position (horizontal-flip augmentation)."""
        return flip_coins(self.seed, positions)


def rank_positions(start: int, batch_index: int, global_batch: int, rank: int,
                   world_size: int) -> np.ndarray:
    """Stream positions of the rank's ``batch_index``-th batch after position ``start``."""
    local = global_batch // world_size
    lo = start + batch_index * global_batch + rank * local
    return np.arange(lo, lo + local, dtype=np.int64)


@lru_cache(maxsize=4)
def _epoch_order(sizes: tuple[int, ...], seed: int, epoch: int) -> np.ndarray:
    rng = epoch_rng(seed, epoch)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parts = []
    for s in rng.permutation(len(sizes)):
        parts.append(offsets[s] + rng.permutation(sizes[s]))
    order = np.concatenate(parts)
    order.setflags(write=False)
    return order

