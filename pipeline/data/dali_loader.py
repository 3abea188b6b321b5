"""The DALI backend: one DALI pipeline per run decodes the batches (nvJPEG on the GPU).

The rank's batches are read in stream order (``order.StreamOrder``, the same samples as the torch
backend, so both resume exactly) by a reading thread ``READ_AHEAD`` batches ahead: each sample's
stored bytes by offset from its shard (``ShardReader.read_at``), damaged samples found and
replaced like the torch backend does (``torch_loader.resolve``). The bytes reach the pipeline
through ``fn.external_source``; the pipeline is built once and only rebuilt after DALI failed on a
batch (a corrupt JPEG), which then takes the CPU path. ``dwt16`` values are checked against the
bounds of a Haar DWT of uint8 pixels (two per-channel reductions on DALI's CPU threads, before the
copy to the device); a batch with damaged values is also taken through the CPU path. With
``device=cpu`` the same pipeline runs on DALI's CPU operators (how CI tests it).

(Until 0.3 DALI's own webdataset reader read the shards from per-segment index files, which
rebuilt the pipeline every few batches once batches mixed shards.)
"""

from __future__ import annotations

import json
import logging
import pickle
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from maskdm.shardformat.haar import out_of_bounds, tensor_shape
from maskdm.shardformat.reader import SampleError, ShardReader

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
    """Raw batches (dicts, like ``RankStream.load``) of one rank, decoded by a DALI pipeline."""

    READ_AHEAD = 3  # batches the reading thread keeps ready beyond the one DALI asks for
    PREFETCH = 2  # DALI's own queue of batches in flight

    def __init__(self, reader: ShardReader, *, order: StreamOrder, start: int, global_batch: int,
                 rank: int, world_size: int, hflip: bool, strict: bool, device: torch.device,
                 threads: int = 4):
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
        self._fallback = RankStream(reader, order=order, start=start, global_batch=global_batch,
                                    rank=rank, world_size=world_size, hflip=hflip, strict=strict)
        # the reading thread has its own reader (own file descriptors; the CPU path uses ours)
        self._reading = pickle.loads(pickle.dumps(reader))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskdm-dali-read")
        self._ahead: dict[int, Future] = {}
        self.dali_errors = 0
        self.builds = 0  # DALI pipelines built: 1, plus one after each batch DALI failed on

    def close(self) -> None:
        pool = getattr(self, "_pool", None)  # (an init that failed made none)
        if pool is not None:
            for f in self._ahead.values():
                f.cancel()
            self._ahead.clear()
            pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ reading
    def _read(self, k: int) -> dict:
        """Batch ``k`` of the rank: the stored bytes of each row (damaged samples replaced), as
        the arrays fed to DALI, with what ``_raw`` needs."""
        reader, dwt16 = self._reading, self._reading.encoding == "dwt16"
        positions = rank_positions(self.start, k, self.global_batch, self.rank, self.world_size)
        stored: dict[int, dict[str, bytes]] = {}

        def probe(i: int, s: int, j: int) -> str:
            key, stored[i] = reader.read_at(s, j)
            return key

        _, _, src, keys, damaged = resolve(reader, positions, self.order, probe, self.strict)
        shape = tensor_shape(reader.image_size)
        arrays = [np.frombuffer(stored[j]["dwt16"], dtype="<f2").reshape(shape) if dwt16
                  else np.frombuffer(stored[j]["jpg"], dtype=np.uint8) for j in src]
        labels = None
        if reader.manifest.labels is not None:
            labels = torch.tensor([json.loads(stored[j]["json"]).get("label", -1) for j in src],
                                  dtype=torch.long)
        return {"positions": positions, "arrays": arrays, "keys": [keys[j] for j in src],
                "labels": labels, "bad": damaged}

    def _batch(self, k: int) -> dict:
        """Batch ``k``, read ahead by the thread; the next ``READ_AHEAD`` are then requested."""
        for n in range(k, k + self.READ_AHEAD + 1):
            if n not in self._ahead:
                self._ahead[n] = self._pool.submit(self._read, n)
        return self._ahead.pop(k).result()

    # ------------------------------------------------------------------ the pipeline
    def _build(self, first: int):
        """A pipeline whose iteration i decodes the rank's batch ``first + i``; -> (iterator,
        the batches fed to it by index, in feeding order)."""
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        fed: dict[int, dict] = {}

        def source(info):
            k = first + info.iteration
            fed[k] = self._batch(k)
            return fed[k]["arrays"]

        gpu = self.device.type == "cuda"
        dwt16 = self.reader.encoding == "dwt16"

        @pipeline_def(batch_size=self.local, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None, seed=self.seed,
                      prefetch_queue_depth=self.PREFETCH)
        def pipe():
            data = fn.external_source(source=source, batch=True, batch_info=True,
                                      dtype=types.FLOAT16 if dwt16 else types.UINT8,
                                      ndim=3 if dwt16 else 1, name="stored")
            if dwt16:
                # value bounds (haar.bounds_problem) on the CPU, before the copy to the device
                max_bits, max_mag = bound_maxima(data)
                return (data.gpu() if gpu else data), max_bits, max_mag
            return fn.decoders.image(data, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB)

        p = pipe()
        p.build()
        self.builds += 1
        names = ["data"] + (["max_bits", "max_mag"] if dwt16 else [])
        # an endless source: the iterator never sizes or resets an epoch
        return DALIGenericIterator([p], names, size=-1, auto_reset=False), fed

    # ------------------------------------------------------------------ iteration
    def batches(self, first_batch: int = 0):
        """Infinite generator of raw batches starting at the rank's batch ``first_batch``."""
        k = first_batch
        while True:
            it, fed = self._build(k)
            try:
                while True:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        raise RuntimeError("the DALI pipeline ended; please report this") from None
                    except (SampleError, OSError):  # from the reading thread: not DALI's fault
                        raise
                    except Exception as e:  # DALI raises its own error types for decode failures
                        self.dali_errors += 1
                        log.warning("DALI failed on batch %d (%s); decoding it on the CPU and "
                                    "rebuilding the pipeline", k, str(e).splitlines()[0][:200])
                        yield self._fallback.load(k, self.order)
                        k += 1
                        break
                    got = fed.pop(k)
                    if "max_bits" in out and self._out_of_bounds(out):
                        # damaged values: the CPU path finds, reports and replaces them exactly as
                        # the torch backend does (rare, so its cost does not matter)
                        yield self._fallback.load(k, self.order)
                    else:
                        yield self._raw(k, got, out)
                    k += 1
            finally:
                del it
                for f in self._ahead.values():  # read for a pipeline that is gone
                    f.cancel()
                self._ahead.clear()

    @staticmethod
    def _out_of_bounds(out) -> bool:
        bits, mag = out["max_bits"].cpu().numpy(), out["max_mag"].cpu().numpy()  # CPU outputs
        return bool(out_of_bounds(bits, mag).any())

    def _raw(self, k: int, got: dict, out) -> dict:
        return {
            "batch_index": k,
            "data": out["data"],
            "labels": got["labels"],
            "keys": got["keys"],
            "flips": torch.from_numpy(self.order.flips(got["positions"])) if self.hflip else None,
            "bad": got["bad"],
        }
