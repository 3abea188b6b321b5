"""maskdm's data pipeline against its peers, side by side on the same images and the same work.

    python -m benchmarks.peers --set faces --count 2048            # procedural faces, 256 px
    python -m benchmarks.peers --set photos --count 1024           # varied sizes, EXIF rotations
    python -m benchmarks.peers --set faces --count 64 --quick      # the mechanics only

Peers (an optional install that never becomes a runtime dependency: `pip install -e '.[bench]'`,
see docs/benchmarks.md for the torch they need): webdataset (TarWriter/ShardWriter + WebDataset),
MosaicML streaming (MDSWriter + StreamingDataset/StreamingDataLoader), LitData (optimize +
StreamingDataset/StreamingDataLoader). Each writes its own shards from the same source folder, fed by the same
decode / EXIF / centre crop / Lanczos resize / JPEG encode (maskdm's, in a process pool of the same
size); `maskdm shard` writes dwt16 and jpeg shards. Every format is then read by its own library
through a torch DataLoader (or its own loader) doing the same work to the same output, the batch
the trainer consumes, on the CPU: the 12-channel Haar tensor at half the image size in model space
(``dwt``) or the [-1, 1] image (``pixel``), with the seeded horizontal flips. Each read row runs in
a fresh process and reports delivered img/s, CPU cores used (process + workers' CPU time / wall),
img/s per core used, time to the first batch, peak RSS of the process tree, bytes on disk per
image, and mid-epoch resume: the time to the first batch after resuming at 50% of an epoch with
the library's own mechanism and whether the resumed stream equals the uninterrupted one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("maskdm-dwt16", "maskdm-jpeg", "webdataset", "mds", "litdata")


# ----------------------------------------------------------------------------- source images
def make_sources(kind: str, count: int, out: Path, size: int = 256) -> Path:
    """A folder of JPEG files: ``faces`` (procedural faces rendered at 1.5x the target size), or
    ``photos`` (the same faces at varied sizes and aspect ratios, a quarter of them stored
    rotated with the EXIF orientation tag that undoes it)."""
    from PIL import Image

    from maskdm.preprocessing.procedural import render
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        path = out / f"{i:06d}.jpg"
        if path.exists():
            continue
        if kind == "faces":
            img = Image.fromarray(render(3, i, size * 3 // 2))
            img.save(path, quality=95)
            continue
        side = int(rng.integers(size, size * 4))
        img = Image.fromarray(render(3, i, side))
        w, h = int(side * rng.uniform(0.75, 1.0)), int(side * rng.uniform(0.75, 1.0))
        img = img.crop((0, 0, w, h))
        exif = Image.Exif()
        if i % 4 == 1:  # stored rotated; orientation 6 says "rotate 90 CW to display"
            img, exif[0x0112] = img.transpose(Image.Transpose.ROTATE_90), 6
        img.save(path, quality=92, exif=exif.tobytes())
    return out


def _prepared_jpeg(path: str, size: int = 256, quality: int = 95) -> tuple[str, bytes]:
    """maskdm's own preprocessing (decode, EXIF, crop, resize) and JPEG encode: what every peer
    writer is fed (`maskdm shard --encoding jpeg` stores these very bytes)."""
    from maskdm.preprocessing.images import encode_jpeg, prepare, read_file
    return Path(path).stem, encode_jpeg(prepare(read_file(path), size).image, quality)


# ----------------------------------------------------------------------------- writers
def _cpu_children() -> float:
    import resource
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return c.ru_utime + c.ru_stime + s.ru_utime + s.ru_stime


def write_all(src: Path, out: Path, workers: int, per_shard: int) -> dict[str, dict]:
    """Shard ``src`` with every writer -> name -> {dir, seconds, cores, img_s, img_s_core,
    bytes_per_image}. Each writer runs in a fresh process (its CPU time is its own)."""
    files = sorted(str(p) for p in src.glob("*.jpg"))
    res = {}
    for fmt in FORMATS:
        dest = out / fmt
        cmd = [sys.executable, "-m", "benchmarks.peers", "write", fmt, str(src), str(dest),
               "--workers", str(workers), "--per-shard", str(per_shard)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode != 0:
            res[fmt] = {"error": (r.stdout + r.stderr).strip().splitlines()[-1][:300]}
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["bytes_per_image"] = sum(f.stat().st_size for f in dest.rglob("*")
                                     if f.is_file()) / len(files)
        res[fmt] = row
    return res


def _write_one(fmt: str, src: Path, dest: Path, workers: int, per_shard: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    files = sorted(str(p) for p in src.glob("*.jpg"))
    t0, c0 = time.perf_counter(), _cpu_children()
    if fmt.startswith("maskdm"):
        enc = "dwt16" if fmt == "maskdm-dwt16" else "jpeg"
        r = subprocess.run([sys.executable, "-m", "maskdm", "shard", str(src), str(dest),
                            "--size", "256", "--encoding", enc, "--workers", str(workers),
                            "--samples-per-shard", str(per_shard), "--quiet"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr.strip()[-500:])
    elif fmt == "litdata":
        from litdata import optimize
        optimize(fn=_litdata_item, inputs=files, output_dir=str(dest), num_workers=workers,
                 chunk_size=per_shard, mode="overwrite")
    else:
        dest.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(workers) as pool:
            items = pool.map(_prepared_jpeg, files, chunksize=16)
            if fmt == "webdataset":
                import webdataset as wds
                with wds.ShardWriter(str(dest / "shard-%06d.tar"), maxcount=per_shard,
                                     verbose=0) as w:
                    for key, jpg in items:
                        w.write({"__key__": key, "jpg": jpg})
            else:
                from streaming import MDSWriter
                with MDSWriter(out=str(dest), columns={"key": "str", "jpg": "bytes"},
                               size_limit=per_shard * 48 * 1024) as w:  # ~per_shard JPEGs
                    for key, jpg in items:
                        w.write({"key": key, "jpg": jpg})
    dt = time.perf_counter() - t0
    cores = (_cpu_children() - c0) / dt
    return {"seconds": dt, "cores": cores, "img_s": len(files) / dt,
            "img_s_core": len(files) / dt / max(cores, 1e-9)}


def _litdata_item(path: str) -> dict:
    key, jpg = _prepared_jpeg(path)
    return {"key": key, "jpg": jpg}


# ----------------------------------------------------------------------------- the batch
def _flip(key: str, seed: int = 0) -> bool:
    """The per-sample flip coin of the peers' pipelines (seeded by key, like a fixed augmentation
    seed would be)."""
    return hashlib.sha256(f"{seed}/{key}".encode()).digest()[0] & 1 == 1


def model_sample(jpg: bytes, key: str, output: str):
    """JPEG bytes -> the model-space tensor the trainer consumes (what every peer's worker does):
    decode, flip, Haar DWT in model space (``dwt``) or [-1, 1] (``pixel``), float32 CHW."""
    import torch
    from PIL import Image

    from maskdm.model import dwt as tdwt
    img = np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))
    if _flip(key):
        img = img[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if output == "pixel":
        return x.float().div_(127.5).sub_(1.0)
    return tdwt.model_from_image(x[None])[0]


class _Peer:
    """One peer's dataset + loader, built fresh (``start``: the state to resume from)."""

    def __init__(self, fmt: str, path: Path, output: str, workers: int, batch: int):
        self.fmt, self.path, self.output, self.workers, self.batch = \
            fmt, path, output, workers, batch

    def loader(self, state=None):
        from torch.utils.data import DataLoader
        out, fmt = self.output, self.fmt
        if fmt == "webdataset":
            import webdataset as wds
            urls = sorted(str(p) for p in self.path.glob("*.tar"))
            ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
                  .shuffle(1000, seed=0)
                  .map(lambda s: (model_sample(s["jpg"], s["__key__"], out), s["__key__"])))
            return DataLoader(ds, batch_size=self.batch, num_workers=self.workers,
                              collate_fn=_collate)
        if fmt == "mds":
            from streaming import StreamingDataLoader
            from streaming.base.util import clean_stale_shared_memory
            clean_stale_shared_memory()
            ds = _MDS(local=str(self.path), shuffle=True, shuffle_seed=0, batch_size=self.batch,
                      output=out)
            dl = StreamingDataLoader(ds, batch_size=self.batch, num_workers=self.workers,
                                     collate_fn=_collate)
            if state is not None:
                dl.load_state_dict(state)
            return dl
        if fmt == "litdata":
            from litdata import StreamingDataLoader
            ds = _Lit(str(self.path), output=out)
            dl = StreamingDataLoader(ds, batch_size=self.batch, num_workers=self.workers,
                                     collate_fn=_collate)
            if state is not None:
                dl.load_state_dict(state)
            return dl
        raise ValueError(fmt)

    def state(self, loader):
        return loader.state_dict() if hasattr(loader, "state_dict") else None


def _collate(items):
    import torch
    return torch.stack([x for x, _ in items]), [k for _, k in items]


def _mds_class():
    from streaming import StreamingDataset

    class MDS(StreamingDataset):
        def __init__(self, *, output: str, **kw):
            super().__init__(**kw)
            self.output = output

        def __getitem__(self, i):
            s = super().__getitem__(i)
            return model_sample(s["jpg"], s["key"], self.output), s["key"]
    return MDS


def _MDS(**kw):
    return _mds_class()(**kw)


def _Lit(path: str, output: str):
    from litdata import StreamingDataset

    class Lit(StreamingDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return model_sample(s["jpg"], s["key"], output), s["key"]
    return Lit(path, shuffle=True, seed=0)


class _Ours:
    """maskdm's Loader over its own shards (torch or DALI backend)."""

    def __init__(self, path: Path, output: str, workers: int, batch: int, backend: str):
        self.path, self.output, self.workers, self.batch, self.backend = \
            path, output, workers, batch, backend

    def loader(self, state=None):
        from maskdm.pipeline.data.loader import Loader
        ld = Loader(self.path, global_batch=self.batch, workers=self.workers, device="cpu",
                    backend=self.backend, space=self.output, seed=0,
                    dali_threads=max(self.workers, 1),
                    samples_seen=(state or {}).get("samples_seen", 0))
        return _OursIter(ld)

    def state(self, loader):
        return loader.ld.state_dict()


class _OursIter:
    def __init__(self, ld):
        self.ld = ld

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.ld)
        return b.x0, list(b.keys)


# ----------------------------------------------------------------------------- one read row
def _tree(pid: int):
    import psutil
    p = psutil.Process(pid)
    return [p] + p.children(recursive=True)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of the live process tree plus the children each of them has reaped (a peer's
    loader restarts its workers every epoch: the finished ones count too)."""
    total = 0.0
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except Exception:
            pass
    return total


def read_row(fmt: str, path: Path, output: str, workers: int, batch: int, batches: int,
             backend: str = "torch") -> dict:
    """Measure one format/backend/workers/batch (run in a fresh process)."""
    import psutil
    import torch
    torch.set_num_threads(1)
    peak = [0]
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            rss = 0
            for p in _tree(os.getpid()):
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], rss)
            stop.wait(0.1)
    threading.Thread(target=sample_rss, daemon=True).start()
    maker = _Ours(path, output, workers, batch, backend) if fmt.startswith("maskdm") \
        else _Peer(fmt, path, output, workers, batch)
    n_images = _count(fmt, path)
    t0 = time.perf_counter()
    dl = maker.loader()
    it = _epochs(dl)
    first = next(it)
    t_first = time.perf_counter() - t0
    for _ in range(2):
        next(it)
    cpu0, w0 = _tree_cpu(os.getpid()), time.perf_counter()
    keys_seen = []
    for _ in range(batches):
        x, keys = next(it)
        keys_seen.append(keys)
    wall = time.perf_counter() - w0
    cpu = _tree_cpu(os.getpid()) - cpu0
    shape = tuple(first[0].shape[1:])
    del it, dl
    # resume at 50% of an epoch with the library's own mechanism
    half = max(1, n_images // 2 // batch)
    resume = _resume(maker, half)
    stop.set()
    img_s = batch * batches / wall
    return {"format": fmt if not fmt.startswith("maskdm") else f"{fmt} ({backend})",
            "output": output, "shape": shape, "workers": workers, "batch": batch,
            "img_s": img_s, "cores": cpu / wall, "img_s_core": img_s / max(cpu / wall, 1e-9),
            "first_batch_s": t_first, "peak_rss_mb": peak[0] / 2 ** 20, **resume}


def _epochs(dl):
    """Batches across epochs: maskdm's loaders run on; a peer's loader ends with its epoch and is
    iterated again (a new epoch, its workers restarted, as a multi-epoch training loop does)."""
    while True:
        n = 0
        for b in dl:
            n += 1
            yield b
        if n == 0:
            raise RuntimeError("the loader delivered no batch")


def _count(fmt: str, path: Path) -> int:
    if fmt.startswith("maskdm"):
        return sum(s["samples"] for s in json.loads((path / "manifest.json").read_text())["shards"])
    if fmt == "webdataset":
        import tarfile
        return sum(len([m for m in tarfile.open(p).getmembers() if m.name.endswith(".jpg")])
                   for p in path.glob("*.tar"))
    if fmt == "mds":
        return sum(s["samples"] for s in json.loads((path / "index.json").read_text())["shards"])
    return sum(c["chunk_size"] for c in json.loads((path / "index.json").read_text())["chunks"])


def _resume(maker, half: int) -> dict:
    """Consume ``half`` batches, take the state, read 3 more (the uninterrupted stream); a fresh
    loader from that state: time to its first batch, and whether its 3 batches are the same."""
    dl = maker.loader()
    it = iter(dl)
    for _ in range(half):
        next(it)
    state = maker.state(dl)
    want = [next(it)[1] for _ in range(3)]
    del it, dl
    if state is None:
        return {"resume": "none (restarts the epoch)", "resume_first_batch_s": None}
    t0 = time.perf_counter()
    dl2 = maker.loader(state)
    it2 = iter(dl2)
    got = [next(it2)[1]]
    dt = time.perf_counter() - t0
    got += [next(it2)[1] for _ in range(2)]
    return {"resume": "exact" if got == want else "differs", "resume_first_batch_s": dt}


# ----------------------------------------------------------------------------- the driver
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "write":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("fmt")
        ap.add_argument("src", type=Path)
        ap.add_argument("dest", type=Path)
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--per-shard", type=int, default=256)
        a = ap.parse_args(argv)
        print(json.dumps(_write_one(a.fmt, a.src, a.dest, a.workers, a.per_shard)))
        return 0
    if argv and argv[0] == "read":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("fmt")
        ap.add_argument("path", type=Path)
        ap.add_argument("--output", default="dwt")
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--batch", type=int, default=32)
        ap.add_argument("--batches", type=int, default=20)
        ap.add_argument("--backend", default="torch")
        a = ap.parse_args(argv)
        print(json.dumps(read_row(a.fmt, a.path, a.output, a.workers, a.batch, a.batches,
                                  a.backend)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("faces", "photos"), default="faces")
    ap.add_argument("--count", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batches", type=int, default=20, help="timed batches per row")
    ap.add_argument("--out", type=Path, default=Path("experiments/peers"))
    ap.add_argument("--quick", action="store_true", help="64 images, 1 worker, batch 8")
    a = ap.parse_args(argv)
    if a.quick:
        a.count, a.workers, a.batch, a.batches = 64, [1], [8], 3
    return drive(a)


def drive(a) -> int:
    root = a.out / f"{a.set}-{a.count}"
    src = make_sources(a.set, a.count, root / "src")
    cores = len(os.sched_getaffinity(0))
    per_shard = max(16, a.count // (4 * cores))  # every core busy when writing
    writes = write_all(src, root / "shards", max(a.workers), per_shard)
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    from maskdm.pipeline.data.dali_loader import dali_available
    plan = [("maskdm-dwt16", "torch"), ("maskdm-jpeg", "torch")]
    if dali_available():
        plan += [("maskdm-dwt16", "dali"), ("maskdm-jpeg", "dali")]
    plan += [(f, "torch") for f in ("webdataset", "mds", "litdata")]
    for output in ("dwt", "pixel"):
        for fmt, backend in plan:
            if "error" in writes.get(fmt, {}):
                continue
            for w in a.workers:
                for b in a.batch:
                    cmd = [sys.executable, "-m", "benchmarks.peers", "read", fmt,
                           str(root / "shards" / fmt), "--output", output, "--workers", str(w),
                           "--batch", str(b), "--batches", str(a.batches), "--backend", backend]
                    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                    if r.returncode == 0:
                        row = json.loads(r.stdout.strip().splitlines()[-1])
                    else:
                        row = {"format": fmt, "output": output, "workers": w, "batch": b,
                               "error": (r.stdout + r.stderr).strip().splitlines()[-1][:200]}
                    row["bytes_per_image"] = writes[fmt].get("bytes_per_image")
                    rows.append(row)
                    print(_fmt_row(row), flush=True)
    result = {"set": a.set, "count": a.count, "date": str(datetime.date.today()),
              "machine": f"{cores} cores, {platform.machine()}", "write": writes, "read": rows,
              "versions": _versions()}
    (root / "peers.json").write_text(json.dumps(result, indent=1))
    print("\n" + table(result))
    return 0


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for d in ("maskdm", "torch", "webdataset", "mosaicml-streaming", "litdata",
              "nvidia-dali-cuda130"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"{r['format']:24s} {r['output']:5s} w{r['workers']} b{r['batch']}: {r['error']}"
    return (f"{r['format']:24s} {r['output']:5s} w{r['workers']} b{r['batch']:<3d} "
            f"{r['img_s']:7.0f} img/s {r['cores']:4.2f} cores {r['img_s_core']:7.0f} img/s/core "
            f"first {r['first_batch_s']:5.2f} s  resume {r['resume']}")


def table(res: dict) -> str:
    lines = [f"### {res['set']} ({res['count']} images, {res['date']}, {res['machine']})", "",
             "Writing (the same preprocessing; img/s per core used):", "",
             "| writer | s | cores | img/s | img/s per core | bytes/image |",
             "|---|---|---|---|---|---|"]
    for fmt, w in res["write"].items():
        if "error" in w:
            lines.append(f"| {fmt} | error: {w['error']} | | | | |")
        else:
            lines.append(f"| {fmt} | {w['seconds']:.1f} | {w['cores']:.2f} | {w['img_s']:.0f} | "
                         f"{w['img_s_core']:.0f} | {w['bytes_per_image'] / 1024:.0f} KiB |")
    lines += ["", "Reading to the model-ready batch on the CPU:", "",
              "| format | output | workers | batch | img/s | cores | img/s per core "
              "| first batch s "
              "| resume at 50% | resume first batch s | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["read"]:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['output']} | {r['workers']} | {r['batch']} | "
                         f"error: {r['error']} | | | | | | |")
            continue
        rf = r["resume_first_batch_s"]
        lines.append(f"| {r['format']} | {r['output']} | {r['workers']} | {r['batch']} | "
                     f"{r['img_s']:.0f} | {r['cores']:.2f} | {r['img_s_core']:.0f} | "
                     f"{r['first_batch_s']:.2f} | {r['resume']} | "
                     f"{'-' if rf is None else f'{rf:.2f}'} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
