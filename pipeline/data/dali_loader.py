"""The DALI backend: ``fn.readers.webdataset`` reads the shards, nvJPEG decodes on the GPU.

To give exactly the order of ``order.StreamOrder`` (so that DALI and torch agree and resume
exactly), each *segment* of the rank's stream (up to about one epoch of its batches) becomes a list
of ``(tar, index)`` pairs and the reader runs with ``random_shuffle=False``: within each batch the
samples are read grouped by shard (the shards in the order the batch first needs them), samples
from one shard that follow each other share one index file listing just them, and the batch's rows
are put back into stream order on the device (one gather; none when the batch was already
grouped, as with one partition and a window of one shard). A segment ends before its pairs
exceed ``MAX_PAIRS`` (the reader opens a file per pair). Damaged samples are found
from the index before the segment is built and replaced like the torch backend does; a sample DALI
cannot decode (corrupt JPEG) makes that batch fall back to the CPU path, after which the pipeline is
rebuilt from the next batch. ``dwt16`` values are checked against the bounds of a Haar DWT of uint8
pixels (two per-channel reductions on DALI's CPU threads, before the copy to the device); a batch
with damaged values is also taken through the CPU path. With ``device=cpu`` the same pipeline runs
on DALI's CPU operators (how CI tests it).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from maskdm.shardformat.haar import out_of_bounds, tensor_shape
from maskdm.shardformat.reader import ShardReader
from maskdm.shardformat.tarfmt import format_index

from .order import StreamOrder, rank_positions
from .torch_loader import RankStream, resolve

log = logging.getLogger("maskdm.data")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def bound_maxima(data):
    """DALI ops (inside a pipeline definition): per channel ``max(bits)`` and ``max(bits &
    0x7FFF)`` of float16 ``[12, h, w]`` samples, as int32 CPU outputs for ``haar.out_of_bounds``."""
    from nvidia.dali import fn, types
    bits = fn.reinterpret(data, dtype=types.UINT16)
    return (fn.cast(fn.reductions.max(bits, axes=[1, 2]), dtype=types.INT32),
            fn.cast(fn.reductions.max(bits & np.uint16(0x7FFF), axes=[1, 2]), dtype=types.INT32))


class DaliStream:
    """Raw batches (dicts, like ``RankStream.load``) of one rank, produced by DALI pipelines."""

    MAX_PAIRS = 512

    def __init__(self, reader: ShardReader, *, order: StreamOrder, start: int, global_batch: int,
                 rank: int, world_size: int, hflip: bool, strict: bool, device: torch.device,
                 threads: int = 4, segment_batches: int | None = None):
        if not dali_available():
            raise RuntimeError("data.backend=dali needs NVIDIA DALI: pip install 'maskdm[dali]' "
                               "(CUDA 12) or 'maskdm[dali-cuda13]'; or use data.backend=torch")
        self.reader, self.seed, self.start = reader, order.seed, start
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local = global_batch // world_size
        self.hflip, self.strict = hflip, strict
        self.device = device
        self.threads = threads
        self.order = order
        per_rank_epoch = max(1, reader.num_samples // global_batch)
        self.segment_batches = segment_batches or min(2000, per_rank_epoch)
        self._tmp = Path(tempfile.mkdtemp(prefix="maskdm-dali-"))
        self._fallback = RankStream(reader, order=order, start=start, global_batch=global_batch,
                                    rank=rank, world_size=world_size, hflip=hflip, strict=strict)
        self.dali_errors = 0

    def close(self) -> None:
        if getattr(self, "_tmp", None) is not None:  # (an init that failed made none)
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ segments
    def _plan(self, first: int, n: int):
        """Per batch: (positions, (shard, j) per slot in reading order, the slot of each row read
        (None: reading order is stream order), keys, damaged samples); at least one batch, at
        most ``n``, ending before the segment's (tar, index) pairs exceed ``MAX_PAIRS``."""
        plan, pairs, last = [], 0, None
        for k in range(first, first + n):
            positions = rank_positions(self.start, k, self.global_batch, self.rank, self.world_size)
            shards, js, src, keys, damaged = resolve(
                self.reader, positions, self.order,
                lambda i, s, j: self.reader.entries(s, j)[0], self.strict)
            slots = [(int(shards[j]), int(js[j])) for j in src]
            first_need = {}
            for s, _ in slots:
                first_need.setdefault(s, len(first_need))
            rows = sorted(range(len(slots)), key=lambda i: first_need[slots[i][0]])  # stable
            reading = [slots[i] for i in rows]
            runs = sum(1 for i, (s, _) in enumerate(reading)
                       if (reading[i - 1][0] if i else last) != s)
            if plan and pairs + runs > self.MAX_PAIRS:
                break
            pairs, last = pairs + runs, reading[-1][0]
            perm = None if rows == list(range(len(rows))) else rows
            plan.append((positions, reading, perm, [keys[j] for j in src], damaged))
        return plan

    def _build(self, first: int, n: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        plan = self._plan(first, n)
        seg = self._tmp / f"seg-{first}"
        seg.mkdir()
        paths, idx_paths, run = [], [], []

        def flush():
            if run:
                shard = run[0][0]
                index = self.reader.index(shard)
                p = seg / f"{len(paths):06d}.idx"
                p.write_text(format_index([index[j] for _, j in run]))
                paths.append(str(self.reader.tar_path(shard)))
                idx_paths.append(str(p))
                run.clear()

        for _, slots, _, _, _ in plan:
            for s, j in slots:
                if run and run[-1][0] != s:
                    flush()
                run.append((int(s), int(j)))
        flush()

        gpu = self.device.type == "cuda"
        enc = self.reader.encoding
        ext = ["dwt16", "json"] if enc == "dwt16" else ["jpg", "json"]

        @pipeline_def(batch_size=self.local, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None, seed=self.seed,
                      prefetch_queue_depth=2)
        def pipe():
            data, meta = fn.readers.webdataset(
                paths=paths, index_paths=idx_paths, ext=ext,
                dtypes=[types.FLOAT16 if enc == "dwt16" else types.UINT8, types.UINT8],
                random_shuffle=False, missing_component_behavior="error", name="reader")
            if enc == "dwt16":
                data = fn.reshape(data, shape=list(tensor_shape(self.reader.image_size)))
                # value bounds (haar.bounds_problem) on the CPU, before the copy to the device
                max_bits, max_mag = bound_maxima(data)
                if gpu:
                    data = data.gpu()
                return data, fn.pad(meta, fill_value=0), max_bits, max_mag
            data = fn.decoders.image(data, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB)
            return data, fn.pad(meta, fill_value=0)

        p = pipe()
        p.build()
        names = ["data", "meta"] + (["max_bits", "max_mag"] if enc == "dwt16" else [])
        it = DALIGenericIterator([p], names, reader_name="reader", auto_reset=False)
        return it, plan, seg

    # ------------------------------------------------------------------ iteration
    def batches(self, first_batch: int = 0):
        """Infinite generator of raw batches starting at the rank's batch ``first_batch``."""
        k = first_batch
        while True:
            n = self.segment_batches
            it, plan, seg = self._build(k, n)
            try:
                for positions, _, perm, keys, bad in plan:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        raise RuntimeError("DALI ended a segment early; please report this") from None
                    except Exception as e:  # DALI raises its own error types for decode failures
                        self.dali_errors += 1
                        log.warning("DALI failed on batch %d (%s); decoding it on the CPU and "
                                    "rebuilding the pipeline", k, str(e).splitlines()[0][:200])
                        yield self._fallback.load(k, self.order)
                        k += 1
                        break
                    if "max_bits" in out and self._out_of_bounds(out):
                        # damaged values: the CPU path finds, reports and replaces them exactly as
                        # the torch backend does (rare, so its cost does not matter)
                        yield self._fallback.load(k, self.order)
                    else:
                        yield self._raw(k, positions, perm, keys, bad, out)
                    k += 1
            finally:
                del it
                shutil.rmtree(seg, ignore_errors=True)

    @staticmethod
    def _out_of_bounds(out) -> bool:
        bits, mag = out["max_bits"].cpu().numpy(), out["max_mag"].cpu().numpy()  # CPU outputs
        return bool(out_of_bounds(bits, mag).any())

    def _raw(self, k, positions, perm, keys, bad, out) -> dict:
        data, labels = out["data"], None
        if self.reader.manifest.labels is not None:
            meta = out["meta"].cpu().numpy()
            labels = torch.tensor([json.loads(bytes(row).rstrip(b"\0")).get("label", -1)
                                   for row in meta], dtype=torch.long)
        if perm is not None:  # rows were read grouped by shard: row r holds slot perm[r]
            inverse = np.argsort(perm)
            data = data[torch.from_numpy(inverse).to(data.device)]
            if labels is not None:
                labels = labels[torch.from_numpy(inverse)]
        return {
            "batch_index": k,
            "data": data,
            "labels": labels,
            "keys": keys,
            "flips": torch.from_numpy(self.order.flips(positions)) if self.hflip else None,
            "bad": bad,
        }
