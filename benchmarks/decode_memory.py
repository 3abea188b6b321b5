"""Peak memory of one sharding worker's decode, per pixel format, at the --max-pixels limit.

Each case runs in a fresh process: a PNG of that mode and size (highly compressible, so the file
is small and the decode is what costs) goes through ``preprocessing.images.prepare`` as a worker
would; the table prints the peak resident memory above the process's baseline, the bytes per
pixel, and whether the image was converted or skipped before decoding.

    python -m benchmarks.decode_memory            # 8000x8000 (the default --max-pixels) etc.
    python -m benchmarks.decode_memory --quick    # 1000x1000, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [("RGB", 1.0), ("L", 1.0), ("I;16", 1.0), ("RGBA", 1.0), ("RGBA", 0.7)]

CHILD = r"""
import json, resource, sys
from maskdm.preprocessing.images import DEFAULT_MAX_PIXELS, Skip, prepare
data = open(sys.argv[1], "rb").read()
max_pixels = int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    prepare(data, 256, max_pixels=max_pixels)
    outcome = "converted"
except Skip as e:
    outcome = "skipped: " + str(e).split(";")[0][:70]
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"peak": peak, "outcome": outcome, "bytes": len(data)}))
"""


MAKE = r"""
import sys
import numpy as np
from PIL import Image
path, mode, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
img = (Image.fromarray(np.full((side, side), 30000, np.uint16)) if mode == "I;16"
       else Image.new(mode, (side, side)))
img.save(path, format="PNG")
"""


def make(path: Path, mode: str, side: int) -> None:
    """The test image, made in a process of its own: a child process starts with its parent's
    peak memory as its own (Linux copies the high-water mark at fork), so the parent stays
    small."""
    subprocess.run([sys.executable, "-c", MAKE, str(path), mode, str(side)], check=True,
                   timeout=600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=8000,
                   help="the side whose square is --max-pixels (default 8000: 64 MP)")
    p.add_argument("--quick", action="store_true", help="--side 1000")
    args = p.parse_args(argv)
    side = 1000 if args.quick else args.side
    max_pixels = side * side
    print(f"--max-pixels {max_pixels:,} ({side}x{side}); one worker, prepare() to 256 px")
    print(f"{'mode':<6} {'size':>11} {'file':>8} {'peak MiB':>9} {'B/pixel':>8}  outcome")
    with tempfile.TemporaryDirectory() as tmp:
        for mode, scale in CASES:
            s = int(side * scale)
            path = Path(tmp) / f"{mode.replace(';', '')}-{s}.png"
            make(path, mode, s)
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(max_pixels)],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                print(f"{mode:<6} {s}x{s}: failed: {r.stderr.strip()[-300:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{mode:<6} {f'{s}x{s}':>11} {res['bytes'] // 1024:>6}KB "
                  f"{res['peak'] / 2 ** 20:>9.0f} {res['peak'] / (s * s):>8.1f}  {res['outcome']}")
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
