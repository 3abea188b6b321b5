"""Partitioned streaming, for real: four torchrun "nodes" on 127.0.0.1 (one CPU rank each, a
cache folder each, nothing shared but an http:// shard folder served by Python's web server)
train one epoch of shards written in sorted order. Together they download each shard about once,
each node only its partitions' shards, every global batch mixes many shards, and the run resumed
on two nodes sees the same samples at every step and ends with the same weights."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, shard_set
from tests.test_cluster import _trace
from tests.test_train import _env, _port, ema

pytest.importorskip("aiohttp", reason="needs aiohttp (the dev extra)")

SHARDS, PER_SHARD, BATCH = 16, 40, 16  # one epoch: 40 global batches


class _Counting(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.gets[self.path.rsplit("/", 1)[-1]] += 1
        super().do_GET()


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory):
    """16 shards of 40 procedural faces, written in source order (--no-shuffle)."""
    return shard_set(tmp_path_factory.mktemp("sorted"), "s", count=SHARDS * PER_SHARD,
                     samples_per_shard=PER_SHARD, shuffle=False)


@pytest.fixture()
def server(sorted_shards):
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Counting, directory=str(sorted_shards)))
    srv.gets = Counter()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _nodes(n: int, url: str, run_dir: Path, caches: Path, *sets: str, resume: bool = False):
    """``n`` single-rank torchrun nodes sharing ``run_dir`` (a shared filesystem), each with its
    own cache folder; returns their outputs."""
    port = _port()
    procs = []
    for node in range(n):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n),
               "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", port, "-m", "maskdm", "train",
               "--config", str(ROOT / "configs" / "test_tiny.yaml"),
               "--set", f"data.shards={url}", "--set", f"train.run_dir={run_dir}",
               "--set", f"data.cache_dir={caches / f'node{node}'}",
               "--set", f"train.scratch_dir={caches / f'scratch{node}'}"]
        for s in sets:
            cmd += ["--set", s]
        if resume:
            cmd += ["--resume", "auto"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(o[-2500:] for o in outs)
    return outs


def _shard_of_key(shards: Path) -> dict[str, int]:
    from maskdm.shardformat.reader import ShardReader
    from maskdm.shardformat.tarfmt import sample_key
    r = ShardReader(shards)
    return {sample_key(e): s for s in range(len(r.used)) for e in r.index(s)}


def _cached_tars(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("*.tar")}


@pytest.mark.slow
def test_four_nodes_download_each_shard_once_mix_batches_and_resume_on_two(
        sorted_shards, server, tmp_path):
    from maskdm.pipeline.data.order import StreamOrder, auto_partitions, uniform_diversity
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    sets = (f"train.global_batch={BATCH}", "train.steps=40", "train.ckpt_every=20",
            "train.log_every=10", "data.trace=true", "data.workers=1")
    outs = _nodes(4, url, tmp_path / "run", tmp_path / "c4", *sets)
    tars = Counter({k: v for k, v in server.gets.items() if k.endswith(".tar")})
    # one epoch over 4 nodes: every shard fetched, all fetches within 1.1x the shard count
    assert len(tars) == SHARDS and sum(tars.values()) <= 1.1 * SHARDS, tars
    # each node fetched only its own partitions' shards (16 partitions, 4 per node)
    sizes = [PER_SHARD] * SHARDS
    order = StreamOrder(sizes, 0, partitions=auto_partitions(SHARDS, BATCH), window=8,
                        global_batch=BATCH)
    from maskdm.pipeline.data.plan import replay
    planned = replay(order, [1] * SHARDS, 4, 1, lookahead=8, cache_limit=None)
    assert planned.total_downloads == sum(tars.values())  # `maskdm plan` said so beforehand
    for node in range(4):
        mine = order.shards_of(order.rank_partitions(node, 4))
        want = {f"shard-{s:06d}.tar" for s in mine}
        assert _cached_tars(tmp_path / "c4" / f"node{node}") == want
        assert planned.first_epoch_shards[node] == mine
    # every global batch mixes many shards although they were written in sorted order
    trace = _trace(tmp_path / "run")
    assert sorted(trace) == list(range(1, 41))
    shard_of = _shard_of_key(sorted_shards)
    mixed = np.mean([len({shard_of[k] for k in keys}) for keys in trace.values()])
    assert mixed >= 0.6 * uniform_diversity(sizes, BATCH), mixed  # uniform: 10.4 of 16
    assert "16 partitions" in outs[0] and "each node reads 4" in outs[0], outs[0][-3000:]

    # resumed from step 20 on two nodes: the same samples at every step, the same weights
    run2 = tmp_path / "on2"
    (run2 / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_00000020",
                    run2 / "checkpoints" / "step_00000020")
    server.gets.clear()
    outs2 = _nodes(2, url, run2, tmp_path / "c2", *sets, resume=True)
    assert "world size 4 -> 2: the data stream continues at sample 320" in outs2[0]
    got = _trace(run2)
    assert sorted(got) == list(range(21, 41)) and all(got[s] == trace[s] for s in got)
    a, b = ema(tmp_path / "run"), ema(run2)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    # half an epoch on 2 nodes: each shard at most once again, by the node that owns it
    tars = Counter({k: v for k, v in server.gets.items() if k.endswith(".tar")})
    assert max(tars.values()) == 1 and len(tars) <= SHARDS
    for node in range(2):
        mine = order.shards_of(order.rank_partitions(node, 2))
        assert _cached_tars(tmp_path / "c2" / f"node{node}") <= \
            {f"shard-{s:06d}.tar" for s in mine}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("small"), "s", count=96, samples_per_shard=16)


@pytest.mark.slow
def test_a_checkpoint_from_before_partitions_continues_its_own_order(small, tmp_path):
    """A checkpoint whose loader state has no partitions/window (maskdm 0.2) resumes with the
    one-partition order it was written with: the same samples as the uninterrupted run of that
    order; asking for another order on resume is refused, naming the setting."""
    from tests.test_train import run_train
    legacy = ("train.steps=6", "train.ckpt_every=3", "data.trace=true")
    ref = run_train(small, tmp_path / "ref", *legacy, "data.partitions=1",
                    "data.shuffle_window=1")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_00000003",
                    run / "checkpoints" / "step_00000003")
    meta_path = run / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["loader"].pop("partitions") == 1 and meta["loader"].pop("window") == 1
    meta_path.write_text(json.dumps(meta))  # what maskdm 0.2 wrote
    refused = run_train(small, run, *legacy, "data.partitions=4", resume="auto")
    assert refused.returncode == 2
    assert "data.partitions is 4 but the checkpoint's data order was written with 1" in \
        refused.stderr, refused.stderr[-2000:]
    r = run_train(small, run, *legacy, resume="auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by maskdm < 0.3, so the run continues with the order it was written" in \
        r.stdout
    want, got = _trace(tmp_path / "ref"), _trace(run)
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got)
    a, b = ema(tmp_path / "ref"), ema(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_the_nodes_benchmark_runs_and_shows_the_difference(tmp_path):
    """`python -m benchmarks.streaming_nodes --quick` (moto S3, 1/2/4 node processes): the
    default order downloads the dataset once over all nodes and mixes batches; the 0.2 order
    downloads it once per node and reads one shard per batch. (MosaicML's rows need the bench
    extra; without it the table says so.)"""
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    r = subprocess.run([sys.executable, "-m", "benchmarks.streaming_nodes", "--quick", "--work",
                        str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import re
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(.*?)\s+(\d+)\s+[\d.]+\s+([\d.]+)x\s+[\d.]+\s+(\d+)%(?:\s+([\d.]+)x)?$",
                     line)
        if m:
            rows[(m[1], int(m[2]))] = (float(m[3]), float(m[4]), m[5] and float(m[5]))
    for n in (1, 2, 4):
        fetched, mixed, planned = rows[("maskdm (default order)", n)]
        assert fetched <= 1.1 and mixed >= 60 and planned == pytest.approx(fetched, abs=0.1)
        fetched, mixed, planned = rows[("maskdm 0.2 order (1 partition, window 1)", n)]
        assert fetched == pytest.approx(n) and mixed < 20 and planned == pytest.approx(n)
    assert "img/s per core" in r.stdout
