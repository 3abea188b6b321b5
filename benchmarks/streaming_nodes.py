"""Partitioned streaming at 1, 2 and 4 "nodes", side by side with MosaicML streaming.

    python -m benchmarks.streaming_nodes                    # 64 sorted shards of 64 samples
    python -m benchmarks.streaming_nodes --quick            # the mechanics only (a test runs it)

The same 32 px procedural faces, written in source order (sorted, as `--no-shuffle` or a tool that
writes identity by identity would), are sharded by `maskdm shard` and by MosaicML's `MDSWriter`
with the same samples per shard, and served by moto's S3 server on 127.0.0.1. For each node count
N, N processes (one rank per node, each with its own cache folder, nothing shared but the bucket)
read one epoch at a global batch of G, each its 1/N of every global batch. Printed per library and
N: the bytes each node downloaded (the most, and all nodes together, against the dataset's size),
and the distinct shards a global batch mixes (mean over the epoch, against a uniform random draw
of G samples). maskdm runs its default order (`data.partitions` automatic, window 8) and, for
reference, the order of maskdm 0.2 (one partition, window 1); MosaicML runs its defaults
(`shuffle=True`, algorithm py1e, its default canonical nodes and shuffle block). A last table
reads a local dwt16 set at 256 px with the torch loader in both orders: delivered img/s per CPU
core (process + workers), so the new order's read cost is measured too.

MosaicML streaming is optional (the `bench` extra; it needs a torchvision that matches torch,
see docs/benchmarks.md); without it its rows say so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _mosaic_available() -> str | None:
    try:
        import streaming  # noqa: F401
    except Exception as e:  # noqa: BLE001 (ImportError, or torchvision that does not match torch)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


# ------------------------------------------------------------------------------------ data
def make_sets(work: Path, shards: int, per: int, size: int) -> dict:
    """maskdm dwt16 shards and MDS shards of the same sorted samples, uploaded to the bucket."""
    from maskdm.preprocessing.shard_job import ShardOptions, run
    local = work / "maskdm"
    if not (local / "manifest.json").exists():
        run(ShardOptions(src="procedural", out=str(local), source="procedural", size=size,
                         count=shards * per, samples_per_shard=per, workers=2, shuffle=False),
            progress=False, log=lambda *a: None)
    mds = work / "mds"
    if _mosaic_available() is None and not (mds / "index.json").exists():
        from streaming import MDSWriter

        from maskdm.shardformat.reader import ShardReader
        reader = ShardReader(local)
        one = reader.read_at(0, 0)[1]["dwt16"]
        # size_limit in bytes: MDS cuts a shard when the next sample would pass it
        limit = int(per * (len(one) + 64) + 32)
        with MDSWriter(out=str(mds), columns={"key": "str", "dwt16": "bytes"},
                       size_limit=limit) as w:
            for s in range(len(reader.used)):
                for j in range(reader.order_sizes[s]):
                    key, comps = reader.read_at(s, j)
                    w.write({"key": key, "dwt16": comps["dwt16"]})
        got = len(json.loads((mds / "index.json").read_text())["shards"])
        assert got == shards, f"MDS wrote {got} shards, expected {shards}"
    import fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bench")
    for name, folder in (("maskdm", local), ("mds", mds)):
        if folder.exists():
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    fs.put_file(str(f), f"bench/{name}/{f.name}")
    return {"local": local, "mds": mds}


def planned(local: Path, nodes: int, batch: int, order: dict) -> int:
    """What `maskdm plan` predicts all ``nodes`` download in the first epoch (bytes)."""
    from maskdm.pipeline.data.order import DEFAULT_WINDOW, StreamOrder, auto_partitions
    from maskdm.pipeline.data.plan import replay
    from maskdm.shardformat.manifest import load_manifest
    m = load_manifest(local)
    sizes, nbytes = [s.samples for s in m.shards], [s.bytes for s in m.shards]
    window = order.get("window") or DEFAULT_WINDOW
    o = StreamOrder(sizes, 0, partitions=order.get("partitions") or
                    auto_partitions(len(sizes), batch), window=window, global_batch=batch)
    lookahead = order.get("lookahead", window)
    r = replay(o, nbytes, nodes, 1, lookahead, None, epochs=1)
    return sum(nbytes[s] for shards in r.first_epoch_shards for s in shards)


def key_to_shard(local: Path) -> dict[str, int]:
    from maskdm.shardformat.reader import ShardReader
    from maskdm.shardformat.tarfmt import sample_key
    r = ShardReader(local)
    return {sample_key(e): s for s in range(len(r.used)) for e in r.index(s)}


# ------------------------------------------------------------------------------------ nodes
def _maskdm_node(url, cache, rank, nodes, batch, steps, order, q):
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import logging
    logging.getLogger("maskdm.data").setLevel(logging.ERROR)  # the --no-shuffle note, per node
    from maskdm.pipeline.data.loader import Loader
    from maskdm.shardformat.reader import ShardReader
    from maskdm.shardformat.remote import CacheOptions
    reader = ShardReader(url, cache=CacheOptions(cache))
    loader = Loader(reader, global_batch=batch, rank=rank, world_size=nodes, workers=0,
                    hflip=False, **order)
    keys = [next(loader).keys for _ in range(steps)]
    loader.close()
    q.put((rank, keys))


def _mosaic_node(url, cache, rank, nodes, batch, steps, out):
    """One MosaicML "node" (run with a /dev/shm and IPC namespace of its own: streaming keeps its
    per-node state in named shared memory, which real nodes do not share); ranks meet through torch.distributed
    (gloo on 127.0.0.1, MASTER_ADDR/MASTER_PORT set by the caller)."""
    os.environ.update(WORLD_SIZE=str(nodes), RANK=str(rank), LOCAL_WORLD_SIZE="1",
                      LOCAL_RANK="0")
    from streaming import StreamingDataset
    ds = StreamingDataset(remote=url, local=cache, shuffle=True, batch_size=batch // nodes,
                          shuffle_seed=0)
    it = iter(ds)
    keys = [[next(it)["key"] for _ in range(batch // nodes)] for _ in range(steps)]
    Path(out).write_text(json.dumps(keys))


def _run_mosaic(url, caches, nodes, batch, steps, work) -> dict[int, list]:
    import subprocess
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=str(ROOT))
    outs = [work / f"mosaic-keys-{nodes}-{r}.json" for r in range(nodes)]
    # a node of its own: a private /dev/shm (POSIX shared memory) and IPC namespace
    node = ('mount -t tmpfs tmpfs /dev/shm && exec "$0" -c "import sys; from '
            'benchmarks.streaming_nodes import _mosaic_node as f; f(sys.argv[1], sys.argv[2], '
            '*map(int, sys.argv[3:7]), sys.argv[7])" "$@"')
    procs = [subprocess.Popen(
        ["unshare", "--mount", "--ipc", "sh", "-c", node, sys.executable,
         url, str(caches[r]), str(r), str(nodes), str(batch), str(steps), str(outs[r])],
        cwd=ROOT, env=env) for r in range(nodes)]
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise RuntimeError(f"a MosaicML node exited with {max(codes)} (its error above)")
    return {r: json.loads(outs[r].read_text()) for r in range(nodes)}


def run_nodes(kind: str, url: str, work: Path, nodes: int, batch: int, steps: int,
              order: dict | None = None) -> tuple[list[int], list[list[str]]]:
    """-> (bytes in each node's cache folder, per global step the keys of all nodes)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    caches = [work / f"cache-{kind}-{nodes}-{i}" for i in range(nodes)]
    for c in caches:
        shutil.rmtree(c, ignore_errors=True)
    procs = []
    if kind == "mosaic":
        got = _run_mosaic(url, caches, nodes, batch, steps, work)
    else:
        procs = [ctx.Process(target=_maskdm_node, args=(url, str(caches[rank]), rank, nodes,
                                                        batch, steps, order, q))
                 for rank in range(nodes)]
        got = {}
    for p in procs:
        p.start()
    while len(got) < nodes:
        try:
            rank, keys = q.get(timeout=5)
            got[rank] = keys
        except Exception:  # noqa: BLE001 (queue.Empty): is everyone still alive?
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a {kind} node exited with {dead[0]} (its error above)")
    for p in procs:
        p.join(timeout=60)
    per_step = [sum((got[r][k] for r in range(nodes)), []) for k in range(steps)]
    sizes = [sum(f.stat().st_size for f in c.rglob("*") if f.is_file()
                 and (f.suffix in (".tar", ".mds"))) for c in caches]
    return sizes, per_step


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ read cost
def read_cost(work: Path, count: int, batch: int) -> list[tuple[str, float, float]]:
    """Torch loader (2 workers) over a local dwt16 set at 256 px: (order, img/s, img/s per
    core) for the 0.2 order and the default partitioned one."""
    from maskdm.pipeline.data.loader import Loader
    from maskdm.preprocessing.shard_job import ShardOptions, run
    local = work / "read256"
    if not (local / "manifest.json").exists():
        run(ShardOptions(src="procedural", out=str(local), source="procedural", size=256,
                         count=count, samples_per_shard=max(8, count // 16), workers=2),
            progress=False, log=lambda *a: None)
    rows = []
    for name, order in (("0.2 order (1 partition, window 1)", dict(partitions=1, window=1)),
                        ("default (partitions auto, window 8)", {})):
        loader = Loader(local, global_batch=batch, workers=2, **order)
        n = count // batch
        next(loader)  # start-up out of the measurement
        c0, t0 = _cpu(), time.perf_counter()
        for _ in range(n - 1):
            next(loader)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        loader.close()
        rows.append((name, (n - 1) * batch / wall, (n - 1) * batch / cpu))
    return rows


def _cpu() -> float:
    """CPU seconds of this process and its finished or running workers (Linux /proc)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += kids.ru_utime + kids.ru_stime
    for pid in _children(os.getpid()):
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--read-count", type=int, default=512,
                   help="images of the 256 px set for the read-cost table (default 512)")
    p.add_argument("--quick", action="store_true", help="16 shards of 16, 64 images read")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    a = p.parse_args(argv)
    if a.quick:
        a.shards, a.per_shard, a.global_batch, a.read_count = 16, 16, 16, 64
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    from moto.server import ThreadedMotoServer
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    port = srv.get_host_and_port()[1]
    env = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
               AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(env)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="maskdm-nodes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sets = make_sets(work, a.shards, a.per_shard, 32)
        shard_of = key_to_shard(sets["local"])
        from maskdm.pipeline.data.order import uniform_diversity
        sizes = [a.per_shard] * a.shards
        uniform = uniform_diversity(sizes, a.global_batch)
        total = sum(f.stat().st_size for f in sets["local"].glob("*.tar"))
        totals = {"maskdm": total,
                  "mosaic": sum(f.stat().st_size for f in sets["mds"].glob("*.mds"))}
        steps = a.shards * a.per_shard // a.global_batch
        print(f"{a.shards} shards x {a.per_shard} samples written in sorted order (dwt16, 32 px, "
              f"{total / 2 ** 20:.1f} MiB), global batch {a.global_batch}, one epoch "
              f"({steps} steps), moto S3 on 127.0.0.1; a uniform random draw mixes {uniform:.1f} "
              f"shards per batch")
        print(f"{'reader':<42} {'nodes':>5} {'max node MiB':>12} {'all nodes / dataset':>19} "
              f"{'shards per batch':>16} {'vs uniform':>10} {'maskdm plan said':>16}")
        why_not = _mosaic_available()
        readers = [("maskdm (default order)", "maskdm", {}),
                   ("maskdm 0.2 order (1 partition, window 1)", "maskdm",
                    dict(partitions=1, window=1, lookahead=2))]
        if why_not is None:
            readers.append(("MosaicML streaming (defaults, py1e)", "mosaic", None))
        for label, kind, order in readers:
            url = "s3://bench/mds" if kind == "mosaic" else "s3://bench/maskdm"
            for n in a.nodes:
                if a.global_batch % n:
                    continue
                node_bytes, per_step = run_nodes(kind, url, work, n, a.global_batch, steps,
                                                 order)
                mixed = np.mean([len({shard_of[k] for k in keys}) for keys in per_step])
                said = "" if kind == "mosaic" else \
                    f"{planned(sets['local'], n, a.global_batch, order) / total:>15.2f}x"
                print(f"{label:<42} {n:>5} {max(node_bytes) / 2 ** 20:>12.2f} "
                      f"{sum(node_bytes) / totals[kind]:>18.2f}x {mixed:>16.1f} "
                      f"{mixed / uniform:>9.0%} {said}", flush=True)
        if why_not is not None:
            print(f"MosaicML streaming: not measured here ({why_not}); install the bench extra "
                  f"where torch and torchvision match (docs/benchmarks.md)")
        print()
        print(f"read cost: torch loader, 2 workers, local dwt16 at 256 px ({a.read_count} images, "
              f"global batch {a.global_batch}), this machine ({os.cpu_count()} cores)")
        print(f"{'order':<38} {'img/s':>8} {'img/s per core':>15}")
        for name, rate, per_core in read_cost(work, a.read_count, a.global_batch):
            print(f"{name:<38} {rate:>8.0f} {per_core:>15.0f}")
    finally:
        srv.stop()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
