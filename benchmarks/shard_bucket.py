"""Sharding from and into a bucket against local disk: ``python -m benchmarks.shard_bucket``.

Starts an S3-compatible server on loopback (moto, in its own process), generates JPEG sources
(``--n`` images of ``--side`` px, VGGFace2-like by default), puts them in the bucket, and shards
the same images four ways: local folder -> local folder, bucket -> local folder, local folder ->
bucket, bucket -> bucket (``maskdm shard``'s own code: sources read 8 ahead per worker, shards
uploaded as they are committed). Reports img/s, per worker, against the local -> local rate, the
images per CPU-second the job itself spent (its processes and workers; the server's CPU is not
counted), the most finished shards the staging folder held at once, and the CPU one GET of a
source object costs through s3fs. The server (Python) shares the machine: on a small machine it
competes with the workers for the cores, so the bucket rows' wall-clock rates are a lower bound;
the CPU column is the job's own cost.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the job's workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _get_cpu_ms(fs, keys: list[str]) -> float:
    """CPU milliseconds of this process per object fetched through s3fs (what a worker reading a
    bucket source uses), 8 threads, every source object once."""
    from concurrent.futures import ThreadPoolExecutor
    s0 = resource.getrusage(resource.RUSAGE_SELF)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fs.cat_file, keys))
    s1 = resource.getrusage(resource.RUSAGE_SELF)
    return (s1.ru_utime + s1.ru_stime - s0.ru_utime - s0.ru_stime) * 1e3 / len(keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.shard_bucket", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="source images (default 600)")
    ap.add_argument("--side", type=int, default=250, help="source side in px (default 250)")
    ap.add_argument("--size", type=int, default=256, help="output side (default 256)")
    ap.add_argument("--samples-per-shard", type=int, default=50)
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="worker counts (default: 1 and all cores)")
    args = ap.parse_args(argv)
    from benchmarks.shard import make_sources
    from maskdm.preprocessing.shard_job import ShardOptions, run, usable_cores
    from maskdm.preprocessing.upload import run_remote
    workers = args.workers or sorted({1, usable_cores()})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                      AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for _ in range(300):
        try:
            fs.mkdir("bench")
            break
        except Exception:  # the server is starting
            time.sleep(0.1)
    tmp = Path(tempfile.mkdtemp(prefix="maskdm-bench-bucket-"))
    rows = []
    try:
        src = tmp / "src"
        print(f"generating {args.n} {args.side}px JPEGs and putting them in s3://bench/src ...",
              flush=True)
        make_sources(src, args.n, args.side, 3)
        fs.put(str(src) + "/", "bench/src/", recursive=True)
        get_ms = _get_cpu_ms(fs, [f"bench/src/{p.name}" for p in sorted(src.iterdir())])
        for w in workers:
            base = None
            for s_in, s_out in (("local", "local"), ("bucket", "local"), ("local", "bucket"),
                                ("bucket", "bucket")):
                name = f"{s_in}-{s_out}-{w}"
                opts = ShardOptions(src=str(src) if s_in == "local" else "s3://bench/src",
                                    out=str(tmp / name), source="folder", size=args.size,
                                    samples_per_shard=args.samples_per_shard, workers=w)
                stage, most = tmp / f"stage-{name}", [0]
                stop = threading.Event()

                def watch(stage=stage, most=most, stop=stop):
                    while not stop.is_set():
                        if stage.exists():
                            most[0] = max(most[0], len(list(stage.glob("shard-*.tar"))))
                        time.sleep(0.01)
                t = threading.Thread(target=watch, daemon=True)
                t.start()
                t0, c0 = time.perf_counter(), _cpu()
                if s_out == "local":
                    m = run(opts, progress=False, log=lambda *a: None)
                else:
                    m = run_remote(opts, f"s3://bench/{name}", stage=str(stage),
                                   progress=False, log=lambda *a: None)
                dt, cpu = time.perf_counter() - t0, _cpu() - c0
                stop.set()
                t.join()
                rate = m.source["selected"] / dt
                base = base or rate
                rows.append((s_in, s_out, w, rate, rate / w, rate / base,
                             m.source["selected"] / cpu,
                             most[0] if s_out == "bucket" else "-", len(m.shards)))
                print(f"  {name}: {rate:.1f} img/s", flush=True)
                shutil.rmtree(tmp / name, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        srv.terminate()
        srv.wait()
    print(f"\n# {datetime.date.today()} {platform.node()}, {usable_cores()} cores, {args.n} "
          f"{args.side}px JPEGs -> {args.size}px dwt16, {args.samples_per_shard} per shard, "
          f"moto S3 on loopback")
    print(f"one GET through s3fs (8 threads): {get_ms:.2f} ms of CPU per object")
    print("| source | output | workers | img/s | img/s per worker | vs local -> local | "
          "img per CPU-second of the job | most shards staged | shards |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.0%} | "
              f"{r[6]:.1f} | {r[7]} | {r[8]} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
