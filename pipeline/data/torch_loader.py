"""The torch backend: DataLoader workers read and decode on the CPU, the device does the rest.

Worker ``w`` of ``n`` builds the rank's batches ``k = w (mod n)``; the DataLoader hands them out in
round-robin order, so the rank sees batches 0, 1, 2, ... whatever ``n`` is.

Workers read straight into a ring of shared-memory batch slots made once, before they start
(``BatchRing``): batch ``k`` is written into slot ``k mod R`` and only its slot number travels
through the DataLoader's queue. A fresh shared-memory segment per batch (what handing a tensor to
the main process otherwise costs: a new mapping and its page faults) cost more than reading the
batch itself (measured: 21 ms against 12 ms for 32 samples at 256 px).

Training on a GPU, a slot holds what was read (float16 coefficients or uint8 pixels) and the
device turns the batch into model space. Training on the CPU (``space`` set), the workers write
model-space float32 samples instead, converting each one as they read it: the conversion then
runs in parallel and on cache-hot data instead of on whole batches in the training process, which
was the bottleneck of the JPEG path (one core busy converting while the workers waited).
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from maskdm.shardformat.haar import check_bounds, tensor_shape
from maskdm.shardformat.reader import SampleError, ShardReader

from .order import StreamOrder, rank_positions
from .transform import model_input_shape, sample_to_model_space


def decode_sample(reader: ShardReader, key: str, comps: dict[str, bytes]):
    """(array, label) of one sample; raises SampleError naming the damage."""
    if reader.encoding == "dwt16":
        raw = comps["dwt16"]
        arr = raw if isinstance(raw, np.ndarray) else \
            np.frombuffer(raw, dtype="<f2").reshape(tensor_shape(reader.image_size))
        problem = check_bounds(arr)  # NaN/Inf and values no Haar DWT of uint8 pixels can have
        if problem:
            raise SampleError(f"{key}: {problem}")
    else:
        n = reader.image_size
        try:
            with warnings.catch_warnings():  # its size is checked below, from the header
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(comps["jpg"]))
            # the header's size first: a huge image in a shard is never decoded
            if img.size != (n, n):
                raise SampleError(f"{key}: jpg is {img.size[0]}x{img.size[1]}, expected {n}x{n}")
            img.load()
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except SampleError:
            raise
        except Exception as e:  # any decoder failure means a damaged sample
            raise SampleError(f"{key}: corrupt JPEG ({type(e).__name__}: {e})") from None
        if arr.shape != (n, n, 3):
            raise SampleError(f"{key}: jpg is {arr.shape}, expected {n}x{n}x3")
    try:
        meta = json.loads(comps["json"])
    except ValueError:
        raise SampleError(f"{key}: json component does not parse") from None
    return arr, meta.get("label")


def replace_bad(n: int, bad: dict) -> list[int]:
    """Source slot for each slot: a bad sample takes the next good one in the batch (cyclic)."""
    if len(bad) == n:
        raise SampleError(f"all {n} samples of a batch are unreadable; the shards are badly "
                          f"damaged: run `maskdm shard --verify` ({next(iter(bad.values()))})")
    src = []
    for i in range(n):
        j = i
        while j in bad:
            j = (j + 1) % n
        src.append(j)
    return src


def damage(reader: ShardReader, shard: int, err: Exception) -> tuple[str, str]:
    """(shard file name, reason) of a damaged sample, as the loaders report it."""
    name = reader.shard_entry(shard).name
    why = str(err)
    return name, why if why.startswith(name) else f"{name}/{why}"


def resolve(reader: ShardReader, positions: np.ndarray, order: StreamOrder, probe, strict: bool):
    """Which samples fill a rank's batch at stream ``positions``; shared by both backends.

    ``probe(i, shard, j)`` reads (or checks) sample ``j`` of ``shard`` for slot ``i`` and returns
    its key, raising ``SampleError``/``OSError`` if it is damaged. A damaged sample is replaced by
    the next good one of the batch. When the whole batch is damaged (consecutive stream positions
    mostly lie in one shard, so a badly damaged shard damages whole batches), the batch is taken
    from the positions ``order.detour(positions, m)`` for m = 1, 2, ... (another part of the
    stream, so other shards) before giving up. Returns (shards, js, source slot per slot, keys,
    damaged) with ``damaged`` the (shard name, reason) of the samples at ``positions`` that could
    not be used, for counting and reporting.
    """
    damaged: list[tuple[str, str]] = []
    for m in range(DETOURS + 1):
        shards, js = order.locate(order.ids_at(order.detour(positions, m)))
        keys, bad = [], {}
        for i, (s, j) in enumerate(zip(shards.tolist(), js.tolist())):
            try:
                keys.append(probe(i, s, j))
            except (SampleError, OSError) as e:
                bad[i] = damage(reader, s, e)
                if strict:
                    raise SampleError(f"{bad[i][1]} (data.strict: fix the shards, or set "
                                      f"data.strict: false to replace damaged samples)") from None
                keys.append(None)
        if m == 0:
            damaged = list(bad.values())
        if len(bad) < len(positions):
            return shards, js, replace_bad(len(positions), bad), keys, damaged
    raise SampleError(f"all {len(positions)} samples of a batch and of {DETOURS} other batches "
                      f"are unreadable: the shards are badly damaged ({damaged[0][1]}); run "
                      f"`maskdm shard --verify {reader.location}`")


DETOURS = 8


class BatchRing:
    """``slots`` shared-memory batches. The DataLoader keeps at most ``workers x prefetch``
    batches in flight and asks for the next one only when the loader has taken the last (which
    it converts into a new tensor at once), so with ``slots = workers x prefetch + 2`` a slot is
    never written while the main process still reads it."""

    def __init__(self, slots: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.slots = slots
        self.data = torch.empty((slots, *shape), dtype=dtype).share_memory_()

    def slot(self, k: int) -> torch.Tensor:
        return self.data[k % self.slots]


class RankStream(IterableDataset):
    """Infinite stream of this rank's raw batches (dicts), starting at batch ``first_batch``.
    With ``space`` ("dwt" or "pixel") a batch's ``data`` is already in model space (float32,
    flips applied, ``"model_space": True``); without, it is what the shards hold."""

    def __init__(self, reader: ShardReader, *, order: StreamOrder, start: int, global_batch: int,
                 rank: int, world_size: int, hflip: bool, strict: bool, first_batch: int = 0,
                 space: str | None = None):
        self.reader, self._order, self.start = reader, order, start
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.hflip, self.strict, self.first_batch = hflip, strict, first_batch
        self.space = space
        self.ring: BatchRing | None = None  # set by make_dataloader for worker processes

    def batch_shape(self) -> tuple[tuple[int, ...], torch.dtype]:
        n = self.global_batch // self.world_size
        r = self.reader
        if self.space is not None:
            return (n, *model_input_shape(r.image_size, self.space)), torch.float32
        if r.encoding == "dwt16":
            return (n, *tensor_shape(r.image_size)), torch.float16
        return (n, r.image_size, r.image_size, 3), torch.uint8

    def order(self) -> StreamOrder:
        return self._order

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order()
        k = self.first_batch + w
        while True:
            try:
                yield self.load(k, order)
            except SampleError as e:
                # handed over as a batch that says so: a generator that raised is dead, and a
                # DataLoader with a dead worker iterator then waits 5 s per worker to shut down
                yield {"batch_index": k, "error": str(e)}
            k += n

    def load(self, k: int, order: StreamOrder) -> dict:
        positions = rank_positions(self.start, k, self.global_batch, self.rank, self.world_size)
        n = len(positions)
        reader = self.reader
        shape, dtype = self.batch_shape()
        in_worker = get_worker_info() is not None and self.ring is not None
        out = self.ring.slot(k) if in_worker else torch.empty(shape, dtype=dtype)
        buf = out.numpy()
        labels = [None] * n
        flip_at = order.flips(positions) if self.hflip else np.zeros(n, dtype=bool)
        space, dwt16 = self.space, reader.encoding == "dwt16"
        # model space: a sample is read into one small buffer and converted into its row
        raw = np.empty(tensor_shape(reader.image_size), dtype="<f2") if space and dwt16 else None

        def probe(i: int, s: int, j: int) -> str:
            if dwt16:
                dst = buf[i] if space is None else raw
                key, meta = reader.read_dwt_into(s, j, dst)
                arr, labels[i] = decode_sample(reader, key, {"dwt16": dst, "json": meta})
            else:
                key, comps = reader.read_at(s, j)
                arr, labels[i] = decode_sample(reader, key, comps)
                if space is None:
                    buf[i] = arr
            if space is not None:
                sample_to_model_space(arr, reader.encoding, bool(flip_at[i]), space, out[i])
            return key

        shards, js, src, keys, damaged = resolve(reader, positions, order, probe, self.strict)
        for i, j in enumerate(src):
            if j == i:
                continue
            if space is None:
                buf[i] = buf[j]
            else:  # the replacement read again and converted with slot i's flip, as on the GPU
                probe(i, int(shards[j]), int(js[j]))
        has_labels = reader.manifest.labels is not None
        flips = torch.from_numpy(flip_at) if self.hflip else None
        return {
            "batch_index": k,
            "model_space": space is not None,
            "data": None if in_worker else out,  # in a worker: slot k of the ring
            "slot": k % self.ring.slots if in_worker else None,
            "labels": torch.tensor([labels[j] for j in src], dtype=torch.long) if has_labels else None,
            "keys": [keys[j] for j in src],
            "flips": flips,
            "bad": damaged,
        }


def make_dataloader(stream: RankStream, workers: int, pin: bool, prefetch: int = 2) -> DataLoader:
    """Workers > 0: the stream gets its ring of shared batch slots first (see ``BatchRing``);
    what travels through the queue is then small, so there is nothing to pin."""
    if workers > 0:
        shape, dtype = stream.batch_shape()
        stream.ring = BatchRing(workers * prefetch + 2, shape, dtype)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin and not workers,
                      prefetch_factor=prefetch if workers > 0 else None,
                      persistent_workers=False)
