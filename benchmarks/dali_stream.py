"""DALI stream throughput and pipeline builds: ``python -m benchmarks.dali_stream SHARDS...``.

Times the DALI backend of the Loader (the pipeline on DALI's CPU operators with ``--device cpu``,
nvJPEG with ``--device cuda``) over ``--batches`` batches of ``--batch`` images in the run's
partitioned order, and counts the DALI pipelines built on the way and the seconds spent building
them (``DaliStream._build``, wrapped). Prints one table row per shard folder.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time


def measure(shards: str, batch: int, batches: int, device: str, threads: int) -> dict:
    import torch

    from maskdm.pipeline.data.dali_loader import DaliStream
    from maskdm.pipeline.data.loader import Loader
    builds, build_s = [0], [0.0]
    original = DaliStream._build

    def counted(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            builds[0] += 1
            build_s[0] += time.perf_counter() - t0

    DaliStream._build = counted
    try:
        loader = Loader(shards, global_batch=batch, seed=0, backend="dali",
                        device=torch.device(device), dali_threads=threads)
        t0 = time.perf_counter()
        next(loader)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(loader)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        del b
        dt = time.perf_counter() - t0
        loader.close()
    finally:
        DaliStream._build = original
    return {"shards": shards, "encoding": loader.reader.encoding, "partitions":
            loader.order.partitions, "first_s": first, "img_s": batch * batches / dt,
            "builds": builds[0], "build_s": build_s[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dali_stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="+", help="shard folders (local)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=300, help="timed batches (default 300)")
    ap.add_argument("--device", default="cpu", help="cpu (DALI's CPU operators) or cuda")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads (default 2)")
    args = ap.parse_args(argv)
    print(f"# {datetime.date.today()} {platform.node()} device={args.device} batch={args.batch} "
          f"batches={args.batches} threads={args.threads}")
    print("| shards | encoding | partitions | first batch s | img/s | pipelines built | "
          "s building |")
    print("|---|---|---|---|---|---|---|")
    for s in args.shards:
        r = measure(s, args.batch, args.batches, args.device, args.threads)
        print(f"| {r['shards']} | {r['encoding']} | {r['partitions']} | {r['first_s']:.2f} | "
              f"{r['img_s']:.0f} | {r['builds']} | {r['build_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
