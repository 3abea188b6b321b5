"""Sharding throughput: images/s (and per worker) at 256x256 from large and small JPEG sources.

    python -m benchmarks.shard [--n-large 96] [--n-small 400] [--workers 1 2] [--size 256]

Sources are generated once into a temporary folder: "large" are 1024x1024 JPEGs (CelebA-HQ-like),
"small" are 250x250 JPEGs (VGGFace2-like, upscaled to 256). Each configuration shards the folder
from scratch; the table reports the steady rate measured by the job itself (wall clock of the whole
run, worker start-up included).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from maskdm.preprocessing.procedural import render
from maskdm.preprocessing.shard_job import ShardOptions, run, usable_cores


def make_sources(folder: Path, n: int, side: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(render(seed, i, 256)).resize((side, side), Image.Resampling.BICUBIC)
        arr = np.asarray(base).astype(np.int16) + rng.integers(-6, 7, (side, side, 3))  # sensor-like grain
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg",
                                                                   quality=92)


def bench(src: Path, size: int, workers: int, encoding: str) -> tuple[float, int]:
    out = Path(tempfile.mkdtemp(prefix="maskdm-bench-"))
    try:
        t0 = time.perf_counter()
        m = run(ShardOptions(src=str(src), out=str(out), source="folder", size=size,
                             encoding=encoding, workers=workers, samples_per_shard=25),
                progress=False, log=lambda *a: None)
        dt = time.perf_counter() - t0
        return m.num_samples / dt, sum(s.bytes for s in m.shards) // max(m.num_samples, 1)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-large", type=int, default=300, help="1024x1024 source images (default 300)")
    ap.add_argument("--n-small", type=int, default=1000, help="250x250 source images (default 1000)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="worker counts to try (default: 1 and all cores)")
    ap.add_argument("--encodings", nargs="+", default=["dwt16", "jpeg"])
    args = ap.parse_args(argv)
    workers = args.workers or sorted({1, usable_cores()})
    tmp = Path(tempfile.mkdtemp(prefix="maskdm-bench-src-"))
    try:
        print(f"generating sources in {tmp} ...", flush=True)
        make_sources(tmp / "large", args.n_large, 1024, 0)
        make_sources(tmp / "small", args.n_small, 250, 1)
        rows = []
        for name in ("large", "small"):
            for enc in args.encodings:
                for w in workers:
                    rate, per = bench(tmp / name, args.size, w, enc)
                    rows.append((name, enc, w, rate, rate / w, per))
        print(f"\nsharding throughput, {platform.processor() or platform.machine()}, "
              f"{usable_cores()} cores, output {args.size}x{args.size}")
        print(f"{'source':<18}{'encoding':<10}{'workers':>8}{'img/s':>10}{'img/s/worker':>14}"
              f"{'bytes/sample':>14}")
        for name, enc, w, rate, per_w, per in rows:
            label = "1024px JPEG" if name == "large" else "250px JPEG"
            print(f"{label:<18}{enc:<10}{w:>8}{rate:>10.1f}{per_w:>14.1f}{per:>14,}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
