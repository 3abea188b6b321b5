"""``Loader``: the training data interface (iterator of ``Batch``) over either backend.

Its state is five scalars, ``{seed, samples_seen, global_batch, partitions, window}``; the order
(``order.StreamOrder``) is recomputed from them, never stored. ``Loader(..., samples_seen=n)`` (or
``load_state_dict``) yields exactly the batches an uninterrupted loader would yield after ``n``
samples. A state without ``partitions``/``window`` (a checkpoint of maskdm before 0.3) continues
with the order it was written with: one partition, a window of one shard.
"""

from __future__ import annotations

import logging
import os
from typing import Literal, get_args

import torch

from maskdm.shardformat.reader import SampleError, ShardReader
from maskdm.shardformat.remote import RemoteError

from .batch import Batch
from .order import DEFAULT_WINDOW, OrderError, StreamOrder, auto_partitions
from .transform import SPACES, model_input_shape, to_model_space

log = logging.getLogger("maskdm.data")
Backend = Literal["torch", "dali"]
BACKENDS = get_args(Backend)


def local_world_size() -> int:
    """Ranks per node, as the launcher says: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE``
    (the deepspeed launcher), ``SLURM_NTASKS_PER_NODE`` (srun; "8(x2)" reads 8); else 1."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        digits = value.split("(")[0].strip()
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


class Loader:
    def __init__(self, shards: str | os.PathLike | ShardReader, *, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device="cpu",
                 backend: str = "torch", workers: int = 2, space: str = "dwt", hflip: bool = True,
                 strict: bool = False, samples_seen: int = 0, dali_threads: int = 4,
                 lookahead: int | None = None,
                 partitions: int | None = None, window: int | None = None):
        """``shards``: a folder, an s3:// / gs:// / http(s):// URL (read through the default
        cache; pass a ``ShardReader`` for other cache settings) or a reader. ``partitions``
        (None: ``order.auto_partitions``) and ``window`` (shards shuffled together per partition,
        None: ``order.DEFAULT_WINDOW``): see ``order.py``. ``lookahead``: shards per partition
        downloaded ahead of the window being read (remote shards only; None: the window)."""
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
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed = int(seed)
        self.device = torch.device(device)
        self.backend, self.workers, self.space = backend, workers, space
        self.hflip, self.strict = hflip, strict
        self.partitions_setting, self.window_setting = partitions, window
        self.legacy_order = False  # restored from a state of maskdm < 0.3
        self.order = self._make_order(
            partitions or auto_partitions(len(self.reader.order_sizes), global_batch),
            window or DEFAULT_WINDOW)
        if self.reader.manifest.shuffle_seed is None and self.order.partitions * self.order.window == 1:
            log.warning("%s was sharded with --no-shuffle: each shard holds neighbouring source "
                        "files and this order reads one shard at a time, so batches are "
                        "correlated; use several partitions or a larger data.shuffle_window", where)
        self.dali_threads = dali_threads
        self.lookahead = lookahead
        self._check_cache()
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

    def _make_order(self, partitions: int, window: int) -> StreamOrder:
        order = StreamOrder(self.reader.order_sizes, self.seed, partitions=partitions,
                            window=window, global_batch=self.global_batch)
        if partitions > len(self.reader.order_sizes):
            log.warning("data.partitions=%d but %s has %d usable shards: partitions share shards, "
                        "so nodes download some shards twice; use at most %d partitions",
                        partitions, self.reader.location, len(self.reader.order_sizes),
                        len(self.reader.order_sizes))
        return order

    def node_partitions(self) -> list[int]:
        """The partitions the ranks of this node read (its ranks: this rank's neighbours by
        ``LOCAL_RANK`` and ``local_world_size()``; without them, this rank alone)."""
        local_world = local_world_size()
        try:
            local = int(os.environ.get("LOCAL_RANK", 0))
        except ValueError:
            local = 0
        first = self.rank - local if 0 <= local <= self.rank else self.rank
        ranks = range(first, min(first + local_world, self.world_size))
        return self.order.ranks_partitions(ranks, self.world_size)

    def cache_need(self) -> tuple[int, int]:
        """What this node's cache must hold at once: (shards, bytes of the largest). Per partition
        its ranks read: the window and the lookahead (at most the partition's shards)."""
        biggest = max(self.reader.shard_entry(s).bytes for s in range(len(self.reader.used)))
        mine = self.node_partitions()
        shards = sum(min(self.window + self.cache_lookahead, len(self.order.pieces[p]))
                     for p in mine)
        return min(shards, len(self.order.shards_of(mine))), biggest

    def _check_cache(self) -> None:
        remote = self.reader.remote
        if remote is None or remote.limit is None:
            return
        shards, biggest = self.cache_need()
        if shards * biggest > remote.limit:
            from maskdm.shardformat.remote import CacheFull
            gib = 2 ** 30
            raise CacheFull(
                f"data.cache_limit_gb={remote.options.limit_gb:.4g} is smaller than what this "
                f"node reads at once: {len(self.node_partitions())} partition(s) x (window "
                f"{self.window} + lookahead {self.cache_lookahead}) = {shards} shards of up to "
                f"{biggest / 2 ** 20:.1f} MiB ({shards * biggest / gib:.3g} GiB); raise "
                f"data.cache_limit_gb to at least {shards * biggest / gib * 1.05:.3g}, or lower "
                f"data.shuffle_window or data.cache_lookahead (more nodes: fewer partitions each)")

    def describe(self) -> str:
        """One line: the order's settings and what each node reads (for the run's log)."""
        o = self.order
        local_world = local_world_size()
        nodes = max(1, self.world_size // local_world)
        per = [len(o.ranks_partitions(range(n * local_world,
                                            min((n + 1) * local_world, self.world_size)),
                                      self.world_size)) for n in range(nodes)]
        shards = len(o.shards_of(self.node_partitions()))
        line = (f"data order: {o.partitions} partitions x shuffle window {o.window} shards "
                f"(a global batch takes {o.per_partition or self.global_batch} sample(s) of each "
                f"partition); {nodes} node(s): each node reads {max(per)} partition(s) "
                f"({shards} of {len(o.sizes)} shards on this node)")
        if self.legacy_order:
            line += ("; the checkpoint was written by maskdm < 0.3, so the run continues with "
                     "the order it was written with (one partition, window 1; a new run gets "
                     "the partitioned order)")
        if sum(per) > o.partitions:
            line += (f"; {nodes} nodes do not split {o.partitions} partitions evenly, so "
                     f"{sum(per) - o.partitions} partition(s) are read by two nodes: use a node "
                     f"count that divides data.partitions")
        return line

    @property
    def partitions(self) -> int:
        return self.order.partitions

    @property
    def window(self) -> int:
        return self.order.window

    def state_dict(self) -> dict:
        return {"seed": self.seed, "samples_seen": self.samples_seen,
                "global_batch": self.global_batch, **self.order.state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved stream. The saved order settings win over the defaults; a setting
        given explicitly (``partitions``/``window`` at construction) must agree with them, or this
        raises ``OrderError`` naming it (changing them would change the samples of every step)."""
        self.close()
        old = "partitions" not in state  # maskdm < 0.3: the single-partition order
        partitions = int(state.get("partitions", 1))
        window = int(state.get("window", 1))
        for key, setting, saved in (("data.partitions", self.partitions_setting, partitions),
                                    ("data.shuffle_window", self.window_setting, window)):
            if setting is not None and int(setting) != saved:
                raise OrderError(
                    f"{key} is {setting} but the checkpoint's data order was written with "
                    f"{saved}{' (a checkpoint of maskdm < 0.3, before partitions)' if old else ''}"
                    f": remove {key} from the config to continue the run, or start a new run")
        self.seed = int(state["seed"])
        self.start = int(state["samples_seen"])
        self.batches_done = 0
        self.legacy_order = old
        self.order = self._make_order(partitions, window)

    # ------------------------------------------------------------------ iteration
    def _raw_iter(self):
        it = self._source_iter()
        # after the DataLoader has forked its workers: a fork while the prefetch thread holds a
        # lock (an import, a logging handler) would leave that lock held in the worker forever
        if self.reader.remote is not None and self.prefetcher is None:
            from .prefetch import Prefetcher
            self.prefetcher = Prefetcher(self.reader, self.order, self.rank, self.world_size,
                                         self.cache_lookahead, self.start)
        return it

    def _source_iter(self):
        common = dict(order=self.order, start=self.start, global_batch=self.global_batch,
                      rank=self.rank, world_size=self.world_size, hflip=self.hflip,
                      strict=self.strict)
        if self.backend == "dali":
            from .dali_loader import DaliStream
            self._dali = DaliStream(self.reader, device=self.device, threads=self.dali_threads,
                                    **common)
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
    def cache_lookahead(self) -> int:
        return self.window if self.lookahead is None else int(self.lookahead)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return model_input_shape(self.reader.image_size, self.space)
