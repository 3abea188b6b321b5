"""``Loader``: the training data interface (iterator of ``Batch``) over either backend.

Its state is three scalars, ``{seed, samples_seen, global_batch}``; the order is recomputed from
them, never stored. ``Loader(..., samples_seen=n)`` (or ``load_state_dict``) yields exactly the
batches an uninterrupted loader would yield after ``n`` samples.
"""

from __future__ import annotations

import logging
import os
from typing import Literal, get_args

import torch

from maskdm.shardformat.reader import SampleError, ShardReader
from maskdm.shardformat.remote import RemoteError

from .batch import Batch
from .transform import SPACES, model_input_shape, to_model_space

log = logging.getLogger("maskdm.data")
Backend = Literal["torch", "dali"]
BACKENDS = get_args(Backend)


class Loader:
    def __init__(self, shards: str | os.PathLike | ShardReader, *, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device="cpu",
                 backend: str = "torch", workers: int = 2, space: str = "dwt", hflip: bool = True,
                 strict: bool = False, samples_seen: int = 0, dali_threads: int = 4,
                 segment_batches: int | None = None, lookahead: int = 2):
        """``shards``: a folder, an s3:// / gs:// / http(s):// URL (read through the default
        cache; pass a ``ShardReader`` for other cache settings) or a reader. ``lookahead``: shards
        downloaded ahead of the one being read (remote shards only)."""
        if backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
        if space not in SPACES:
            raise ValueError(f"data.space must be one of {SPACES}, got {space!r}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"the global batch ({global_batch}) must be a positive multiple of "
                             f"the world size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.reader = shards if isinstance(shards, ShardReader) else ShardReader(shards)
        where = self.reader.location
        excluded = self.reader.excluded
        if excluded and strict:
            raise SampleError(f"{len(excluded)} damaged shard(s) in {where}: "
                              f"{'; '.join(excluded.values())} (data.strict: fix the shards, or "
                              f"set data.strict: false to train without them)")
        if excluded:
            lost = self.reader.manifest.num_samples - self.reader.num_samples
            log.warning("%d damaged shard(s) left out of the order (%d of %d samples): %s; run "
                        "`maskdm shard --verify %s`", len(excluded), lost,
                        self.reader.manifest.num_samples, "; ".join(excluded.values()), where)
        if self.reader.manifest.shuffle_seed is None:
            log.warning("%s was sharded with --no-shuffle: each shard holds neighbouring source "
                        "files, so batches are correlated; re-shard without --no-shuffle", where)
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed = int(seed)
        self.device = torch.device(device)
        self.backend, self.workers, self.space = backend, workers, space
        self.hflip, self.strict = hflip, strict
        self.dali_threads, self.segment_batches = dali_threads, segment_batches
        if self.reader.remote is not None and segment_batches is None:
            # a DALI segment opens every shard it spans: keep it within the cache window
            self.segment_batches = max(1, min(self.reader.order_sizes) // self.local_batch)
        self.lookahead = lookahead
        self.prefetcher = None
        self.start = int(samples_seen)
        self.batches_done = 0
        self.skipped_samples = 0
        self.damaged_shards: dict[str, int] = {}  # shard -> samples replaced (this rank)
        self._it = None
        self._dali = None

    # ------------------------------------------------------------------ state
    @property
    def samples_seen(self) -> int:
        """Global stream position: samples consumed by all ranks together."""
        return self.start + self.batches_done * self.global_batch

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.reader.num_samples

    def state_dict(self) -> dict:
        return {"seed": self.seed, "samples_seen": self.samples_seen,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.seed = int(state["seed"])
        self.start = int(state["samples_seen"])
        self.batches_done = 0

    # ------------------------------------------------------------------ iteration
    def _raw_iter(self):
        it = self._source_iter()
        # after the DataLoader has forked its workers: a fork while the prefetch thread holds a
        # lock (an import, a logging handler) would leave that lock held in the worker forever
        if self.reader.remote is not None and self.prefetcher is None:
            from .prefetch import Prefetcher
            self.prefetcher = Prefetcher(self.reader, self.seed, self.lookahead, self.start)
        return it

    def _source_iter(self):
        common = dict(seed=self.seed, start=self.start, global_batch=self.global_batch,
                      rank=self.rank, world_size=self.world_size, hflip=self.hflip,
                      strict=self.strict)
        if self.backend == "dali":
            from .dali_loader import DaliStream
            self._dali = DaliStream(self.reader, device=self.device, threads=self.dali_threads,
                                    segment_batches=self.segment_batches, **common)
            return self._dali.batches(0)
        from .torch_loader import RankStream, make_dataloader
        # on the CPU the workers convert to model space themselves (see torch_loader)
        stream = RankStream(self.reader, **common,
                            space=self.space if self.device.type == "cpu" else None)
        self._stream = stream
        return iter(make_dataloader(stream, self.workers, pin=self.device.type == "cuda"))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._raw_iter()
        if self.prefetcher is not None:
            self.prefetcher.advance(self.samples_seen)
        try:
            raw = next(self._it)
        except (SampleError, RemoteError) as e:  # from a worker: the message, not the wrapping
            text = str(e)
            if "Traceback" in text:
                text = text.strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]
            raise type(e)(text) from None
        if "error" in raw:  # a worker's SampleError (data.strict, or a badly damaged set)
            raise SampleError(raw["error"])
        if raw["batch_index"] != self.batches_done:  # the round-robin contract, checked
            raise RuntimeError(f"loader produced batch {raw['batch_index']}, expected "
                               f"{self.batches_done}")
        self.batches_done += 1
        for shard, why in raw["bad"]:
            if shard not in self.damaged_shards:  # one line per damaged shard, not per sample
                log.warning("damaged data in %s: %s; its unreadable samples are replaced by "
                            "other samples and counted (skipped_samples)", shard, why)
            self.damaged_shards[shard] = self.damaged_shards.get(shard, 0) + 1
        self.skipped_samples += len(raw["bad"])
        data = raw["data"] if raw["data"] is not None else self._stream.ring.slot(raw["slot"])
        # a ring slot is read here, once: the model-space tensor below is a new one
        if raw.get("model_space"):
            x0 = data.clone() if raw["data"] is None else data
        else:
            x0 = to_model_space(data, self.reader.encoding, raw["flips"], self.space, self.device)
        labels = raw["labels"].to(self.device, non_blocking=True) if raw["labels"] is not None else None
        flips = raw["flips"].to(self.device, non_blocking=True) if raw["flips"] is not None else None
        return Batch(x0=x0, labels=labels, keys=raw["keys"], flips=flips)

    def close(self) -> None:
        self._it = None
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self._dali is not None:
            self._dali.close()
            self._dali = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return model_input_shape(self.reader.image_size, self.space)
