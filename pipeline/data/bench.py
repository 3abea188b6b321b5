"""``maskdm bench data SHARDS...``: how fast the loaders deliver ready batches.

For each shard folder (its encoding) and backend: images/s of batches ready on the device, MB/s
read from the shards, CPU cores used (process + worker CPU time / wall time), alone and with a
simulated training consumer that holds each batch for ``--step-ms`` (the data-wait fraction is the
share of time the consumer waited for data). A ``raw`` row gives the rate of one core doing exactly
a worker's job (read + decode into a batch) with no loader machinery: the yardstick for per-worker
efficiency. On a CPU device the torch workers also do the model-space conversion, and a
``raw+model space`` row is their yardstick.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_rate(reader, batch: int, n_batches: int, space: str | None = None
             ) -> tuple[float, float]:
    """One core doing exactly a worker's job (read + decode into a batch; with ``space``, into a
    model-space batch, as the torch workers do on a CPU device), no loader: img/s, MB/s."""
    from .order import DEFAULT_WINDOW, StreamOrder, auto_partitions
    from .torch_loader import RankStream
    order = StreamOrder(reader.order_sizes, 0, window=DEFAULT_WINDOW, global_batch=batch,
                        partitions=auto_partitions(len(reader.order_sizes), batch))
    stream = RankStream(reader, order=order, start=0, global_batch=batch, rank=0, world_size=1,
                        hflip=True, strict=False, space=space)
    stream.load(0, order)
    t0 = time.perf_counter()
    for k in range(1, n_batches + 1):
        stream.load(k, order)
    dt = time.perf_counter() - t0
    per_sample = sum(s.bytes for s in reader.manifest.shards) / max(reader.manifest.num_samples, 1)
    n = batch * n_batches
    return n / dt, n * per_sample / dt / 1e6


def integrity_cost(reader, batch: int, n_batches: int) -> dict[str, float] | None:
    """Cost of the per-sample value check of ``dwt16`` tensors (``haar.check_bounds``), in
    microseconds per image on one core: as the torch workers run it (numpy), and as DALI runs it
    (two reductions on its CPU threads, timed in a pipeline with and without them)."""
    if reader.encoding != "dwt16":
        return None
    import numpy as np

    from maskdm.shardformat.haar import check_bounds, tensor_shape
    n = min(batch * n_batches, reader.num_samples)
    shards = [s for s, size in enumerate(reader.order_sizes) for _ in range(size)][:n]
    js = [j for size in reader.order_sizes for j in range(size)][:n]
    arrs = [np.empty(tensor_shape(reader.image_size), np.float16) for _ in range(n)]
    for a, s, j in zip(arrs, shards, js):
        reader.read_dwt_into(s, j, a)
    t0 = time.perf_counter()
    for _ in range(3):
        for a in arrs:
            check_bounds(a)
    out = {"torch": (time.perf_counter() - t0) / (3 * n) * 1e6}
    from .dali_loader import dali_available
    if dali_available():
        out["dali"] = _dali_check_cost(arrs)
    return out


def _dali_check_cost(arrs, repeats: int = 8) -> float:
    """The check's ops added ``repeats`` times to a pipeline, against none: the difference per
    repeat (a single copy is below the run-to-run noise of the pipeline itself)."""
    from nvidia.dali import fn, pipeline_def, types

    from .dali_loader import bound_maxima

    def timed(k: int) -> float:
        @pipeline_def(batch_size=len(arrs), num_threads=1, device_id=None)
        def pipe():
            d = fn.external_source(source=lambda: arrs, batch=True, dtype=types.FLOAT16)
            outs = [d]
            for _ in range(k):
                outs += list(bound_maxima(d))  # exactly the loader's ops
            return tuple(outs)
        p = pipe()
        p.build()
        p.run()
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            p.run()
            best = min(best, time.perf_counter() - t0)
        return best
    return max(0.0, timed(repeats) - timed(0)) / repeats / len(arrs) * 1e6


def _progress(row) -> None:
    print(f"  measured {row[0]} {row[2]} x{row[3]}: {row[4]} img/s delivered", file=sys.stderr,
          flush=True)


def run_one(shards: str, backend: str, workers: int, batch: int, batches: int, device,
            step_ms: float, raw_only: bool = False) -> dict:
    """Time ``batches`` batches; ``raw_only``: the backend's batches as they reach the training
    process, before the model-space transform (what the workers alone deliver)."""
    import torch

    from maskdm.shardformat.reader import ShardReader

    from .loader import Loader
    reader = ShardReader(shards)
    threads = torch.get_num_threads()
    if device.type == "cpu" and backend == "torch":
        # the consumer's own thread pool must not spin on the cores the workers need
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    loader = Loader(reader, global_batch=batch, backend=backend, workers=workers, device=device,
                    seed=0, dali_threads=max(workers, 1))
    per_sample = sum(s.bytes for s in reader.manifest.shards) / max(reader.manifest.num_samples, 1)
    source = loader._raw_iter() if raw_only else loader
    for _ in range(3):  # start-up (worker spawn, pipeline build) is not throughput
        next(source)
    _sync(device)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    wait = 0.0
    for _ in range(batches):
        w0 = time.perf_counter()
        b = next(source)
        _sync(device)
        wait += time.perf_counter() - w0
        if step_ms:
            time.sleep(step_ms / 1e3)  # the GPU would be busy; the host is free
    dt = time.perf_counter() - t0
    loader.close()
    torch.set_num_threads(threads)
    del b
    time.sleep(0.2)  # let DataLoader workers exit so their CPU time is accounted
    cpu = _cpu_seconds() - cpu0
    n = batch * batches
    return {"img_s": n / dt, "mb_s": n * per_sample / dt / 1e6, "cores": cpu / dt,
            "wait": wait / dt}


def run_remote(url: str, args, device) -> int:
    """Object storage: one epoch with an empty cache (cold: every shard downloaded while the
    consumer trains), the same epoch again (warm: read from the cache), and the warm cache against
    the same shards read as a local folder (the cache folder itself), each with and without a
    consumer taking ``--step-ms`` per batch."""
    import shutil
    import tempfile

    from maskdm.shardformat.manifest import DatasetError
    from maskdm.shardformat.reader import ShardReader
    from maskdm.shardformat.remote import CacheOptions

    from .loader import Loader
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="maskdm-bench-cache-"))
    try:
        reader = ShardReader(url, cache=CacheOptions(str(cache_dir)))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in reader.directory.glob("*.tar"):  # cold means cold
        p.unlink()
    epoch = max(1, reader.num_samples // args.batch)
    step = args.step_ms if args.step_ms is not None else 20.0
    total_mb = sum(s.bytes for s in reader.manifest.shards) / 1e6
    w = (args.workers or [min(4, len(os.sched_getaffinity(0)))])[0]

    def one(source, what, step_ms, epochs=1):
        loader = Loader(source, global_batch=args.batch, workers=w, device=device, seed=0,
                        dali_threads=max(w, 1), backend=(args.backends or ["torch"])[0])
        t0, wait = time.perf_counter(), 0.0
        for _ in range(epoch * epochs):
            w0 = time.perf_counter()
            next(loader)
            _sync(device)
            wait += time.perf_counter() - w0
            if step_ms:
                time.sleep(step_ms / 1e3)
        dt = time.perf_counter() - t0
        pre = loader.prefetcher
        hit = "-" if pre is None or pre.hit_rate is None else f"{pre.hit_rate:.0%}"
        downloads = "-" if pre is None else str(pre.remote.stats["downloads"])
        loader.close()
        rate = epoch * epochs * args.batch / dt
        row = (what, str(epochs), f"{step_ms:.0f}", f"{rate:.0f}", f"{wait / dt:.0%}", hit,
               downloads)
        print(f"  measured {what} step {step_ms:.0f} ms: {rate:.0f} img/s", file=sys.stderr,
              flush=True)
        return row, rate

    def remote():
        return ShardReader(url, cache=CacheOptions(str(cache_dir)))
    rows = []
    rows.append(one(remote(), "remote, cold cache", step)[0])
    rows.append(one(remote(), "remote, warm cache", step, 3)[0])
    warm_row, warm = one(remote(), "remote, warm cache", 0, 3)
    rows.append(warm_row)
    local_row, local = one(ShardReader(reader.directory), "local folder (the cache)", 0, 3)
    rows.append(local_row)
    print(f"\nobject storage: {url} ({reader.num_samples} samples, {len(reader.used)} shards, "
          f"{total_mb:.0f} MB), batch {args.batch}, {w} worker(s), "
          f"{datetime.date.today().isoformat()}")
    head = ("read from", "epochs", "step ms", "img/s", "data wait", "cache hits", "downloads")
    widths = [max(len(str(r[i])) for r in rows + [head]) + 2 for i in range(len(head))]
    for r in [head] + rows:
        print("".join(str(v).rjust(wd) if i else str(v).ljust(wd)
                      for i, (v, wd) in enumerate(zip(r, widths))))
    print(f"warm cache / local folder: {warm / local:.1%} of the local rate. cache hits: shards "
          f"already cached when they entered the download window; data wait: share of the time a "
          f"consumer taking 'step ms' per batch waited for data")
    if not args.cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maskdm bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("shards", nargs="+", metavar="SHARDS",
                    help="shard folders to read; an s3:// / gs:// / http(s):// folder is measured "
                    "cold (empty cache), warm, and against the same shards on local disk")
    ap.add_argument("--cache-dir", default=None,
                    help="object storage: the cache folder (default: a temporary one, removed)")
    ap.add_argument("--backends", nargs="+", default=None, choices=["torch", "dali"],
                    help="default: torch, plus dali when installed")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="loader workers / DALI threads to try (default: 1 and all cores)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per row (default 30)")
    ap.add_argument("--step-ms", type=float, default=None,
                    help="simulated training step per batch (default: twice the batch time "
                    "measured without a consumer, i.e. a consumer at half the loader's rate)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args) -> int:
    import torch

    from maskdm.shardformat.manifest import DatasetError
    from maskdm.shardformat.reader import ShardReader

    from .dali_loader import dali_available
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cores = len(os.sched_getaffinity(0))
    backends = args.backends or (["torch", "dali"] if dali_available() else ["torch"])
    if "dali" in backends and not dali_available():
        print("error: --backends dali needs NVIDIA DALI, which is not installed: pip install "
              "'maskdm[dali]' (CUDA 12) or 'maskdm[dali-cuda13]'", file=sys.stderr)
        return 2
    workers = args.workers or sorted({1, cores})
    rows, checks = [], []
    from maskdm.shardformat.remote import is_remote
    for url in [s for s in args.shards if is_remote(s)]:
        code = run_remote(url, args, device)
        if code:
            return code
    args.shards = [s for s in args.shards if not is_remote(s)]
    if not args.shards:
        return 0
    for shards in args.shards:
        try:
            reader = ShardReader(shards)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        enc = reader.encoding
        n_raw = max(3, min(20, reader.num_samples // args.batch))
        r_img, r_mb = raw_rate(reader, args.batch, n_raw)
        cost = integrity_cost(reader, args.batch, 4)
        if cost:
            checks.append(f"{shards}: torch workers {cost['torch']:.1f} us/img ("
                          f"{cost['torch'] * r_img / 1e6:.1%} of the raw read+decode time)"
                          + (f", DALI {cost['dali']:.1f} us/img of one CPU thread"
                             if "dali" in cost else ""))
        rows.append((shards, enc, "raw (1 core)", "-", f"{r_img:.0f}", "100%", "-",
                     f"{r_mb:.0f}", "1.00", "-", "-"))
        _progress(rows[-1])
        # on a CPU device the torch workers also convert to model space: their yardstick too
        r_ms = None
        if device.type == "cpu" and "torch" in backends:
            r_ms, r_ms_mb = raw_rate(reader, args.batch, n_raw, space="dwt")
            rows.append((shards, enc, "raw+model space", "-", f"{r_ms:.0f}", "100%", "-",
                         f"{r_ms_mb:.0f}", "1.00", "-", "-"))
            _progress(rows[-1])
        for backend in backends:
            for w in workers:
                raw = run_one(shards, backend, w, args.batch, args.batches, device, 0, True)
                free = run_one(shards, backend, w, args.batch, args.batches, device, 0)
                step = (args.step_ms if args.step_ms is not None
                        else 2e3 * args.batch / free["img_s"])
                busy = run_one(shards, backend, w, args.batch, args.batches, device, step)
                yardstick = r_ms if backend == "torch" and r_ms else r_img
                per_worker = raw["img_s"] / max(w, 1) / yardstick
                rows.append((shards, enc, backend, str(w), f"{raw['img_s']:.0f}",
                             f"{per_worker:.0%}", f"{free['img_s']:.0f}", f"{free['mb_s']:.0f}",
                             f"{free['cores']:.2f}", f"{step:.0f}", f"{busy['wait']:.0%}"))
                _progress(rows[-1])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    print(f"\ndata loading, {name}, {cores} cores, batch {args.batch}, device {device}, "
          f"{datetime.date.today().isoformat()}")
    head = ("shards", "encoding", "backend", "workers", "delivered", "per-worker", "ready img/s",
            "MB/s", "cores", "step ms", "data wait")
    widths = [max(len(str(r[i])) for r in rows + [head]) + 2 for i in range(len(head))]
    for r in [head] + rows:
        print("".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in
                      enumerate(zip(r, widths))))
    print("delivered: img/s of the backend's batches reaching the training process (on a CPU "
          "device the torch workers' batches are already in model space, DALI's are not); "
          "per-worker: that per worker, relative to one core doing the same work with no loader "
          "(raw: read + decode; raw+model space: and the conversion); ready: img/s of "
          "model-space batches on the device; cores: CPU time / wall time; data wait: share of "
          "wall time a consumer taking 'step ms' per batch waited for data")
    for line in checks:
        print(f"value check of dwt16 samples (included in the rates above), {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
