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
    for node in range(4):
        mine = order.shards_of(order.rank_partitions(node, 4))
        want = {f"shard-{s:06d}.tar" for s in mine}
        assert _cached_tars(tmp_path / "c4" / f"node{node}") == want
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
