"""Shards in object storage, against a real S3-compatible server started here (moto's standalone
server on 127.0.0.1, reached by s3fs through AWS_ENDPOINT_URL): the loaders read s3:// folders
through the node cache with the same batches as the local folder; the cache is verified, shared
between processes, bounded; faults (a dead server, a changed object, a cut download, a full disk)
end clearly; training from a bucket resumes exactly."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch


moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
pytest.importorskip("s3fs", reason="needs s3fs (the dev extra)")

from maskdm.pipeline.data.loader import Loader  # noqa: E402
from maskdm.shardformat.reader import SampleError, ShardReader  # noqa: E402
from maskdm.shardformat.remote import CacheFull, CacheOptions, RemoteShards  # noqa: E402


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and torch.equal(x.x0, y.x0) and torch.equal(x.flips, y.flips)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_bucket_gives_the_batches_of_the_local_folder_and_a_warm_cache(s3, tmp_path, backend):
    if backend == "dali":
        from maskdm.pipeline.data.dali_loader import dali_available
        if not dali_available():
            pytest.skip("needs NVIDIA DALI")
    cache = CacheOptions(str(tmp_path / "cache"))
    kw = dict(global_batch=8, seed=3, backend=backend, workers=2)
    local = _take(Loader(s3["local"], **kw), 30)  # 240 samples: 2.5 epochs
    cold = Loader(ShardReader(s3["url"], cache=cache), **kw)
    _same(_take(cold, 30), local)
    warm = Loader(ShardReader(s3["url"], cache=cache), **kw)
    batches = [next(warm) for _ in range(12)]
    _same(batches, local[:12])
    assert warm.prefetcher.hit_rate == 1.0 and warm.prefetcher.stats["downloads"] == 0
    warm.close()
    # the cache holds verified copies only: no partial file, and the manifest's sha256 per shard
    names = {p.name for p in (tmp_path / "cache").glob("*/*")}
    assert not [n for n in names if n.endswith(".part")]
    assert len([n for n in names if n.endswith(".tar")]) == 6


def test_an_http_folder_gives_the_batches_of_the_local_folder(s3, tmp_path):
    """http(s)://: any web server that lists a folder (here Python's own on 127.0.0.1); sizes come
    from HEAD requests, the rest is the same cache."""
    pytest.importorskip("aiohttp", reason="needs aiohttp (the dev extra)")
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(s3["local"])))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        reader = ShardReader(url, cache=CacheOptions(str(tmp_path / "cache")))
        assert reader.num_samples == 96 and not reader.excluded
        kw = dict(global_batch=8, seed=1, workers=0)
        _same(_take(Loader(reader, **kw), 14), _take(Loader(s3["local"], **kw), 14))
    finally:
        srv.shutdown()


def test_a_resumed_loader_refills_the_cache_from_where_it_stopped(s3, tmp_path):
    cache = CacheOptions(str(tmp_path / "cache"))
    full = _take(Loader(s3["local"], global_batch=8, workers=0), 14)
    first = Loader(ShardReader(s3["url"], cache=cache), global_batch=8, workers=0)
    _take(first, 5)
    state = first.state_dict()
    shutil.rmtree(tmp_path / "cache")  # another node, or a wiped disk
    resumed = Loader(ShardReader(s3["url"], cache=cache), global_batch=8, workers=0)
    resumed.load_state_dict(state)
    _same(_take(resumed, 9), full[5:])


def test_a_cache_smaller_than_the_dataset_evicts_and_downloads_each_shard_once_per_epoch(
        s3, tmp_path):
    reader = ShardReader(s3["url"], cache=CacheOptions(str(tmp_path / "c"), 0))
    shard = max(s.bytes for s in reader.manifest.shards)
    limit_gb = 3.5 * shard / 2 ** 30  # room for 3 of the 6 shards: the window (1 + lookahead 2)
    reader = ShardReader(s3["url"], cache=CacheOptions(str(tmp_path / "cache"), limit_gb))
    got = []  # the shards the store was asked for, in order (the client call, counted)
    real = reader.remote.fs.get_file

    def counted(rpath, lpath, **kw):
        got.append(Path(rpath).name)
        return real(rpath, lpath, **kw)
    reader.remote.fs.get_file = counted
    loader = Loader(reader, global_batch=8, workers=0, lookahead=2, partitions=1, window=1)
    for _ in range(12):  # one epoch: 96 samples
        next(loader)
        files = reader.remote.cached_bytes()
        assert sum(files.values()) <= limit_gb * 2 ** 30  # complete shards: the limit holds
    loader.close()
    # every shard once in the epoch; the only repeats allowed are the shards the window reaches
    # into the next epoch with (downloaded ahead in the background, evicted since their first use)
    from collections import Counter
    from maskdm.pipeline.data.order import StreamOrder
    order = StreamOrder(reader.order_sizes, loader.seed)  # one partition, window 1
    nxt = list(dict.fromkeys(int(i) for i in order.locate(order.epoch(1))[0]))[:2]
    ahead = {reader.shard_entry(i).name for i in nxt}
    counts = Counter(n for n in got if n.endswith(".tar"))
    assert sorted(counts) == sorted(s.name for s in reader.manifest.shards)
    assert all(c == 1 or (c == 2 and n in ahead) for n, c in counts.items()), counts
    assert reader.remote.stats["evictions"] >= 3
    with pytest.raises(CacheFull, match="smaller than what this node reads at once: 1 "
                                        r"partition\(s\) x \(window 1 \+ lookahead 2\) = 3 shards"):
        tiny = ShardReader(s3["url"], cache=CacheOptions(str(tmp_path / "t"), shard / 2 ** 31))
        tiny_loader = Loader(tiny, global_batch=8, workers=0, lookahead=2, partitions=1, window=1)
        for _ in range(30):
            next(tiny_loader)


def _fetch_all(url, cache_dir, names, q):
    remote = RemoteShards(url, CacheOptions(cache_dir))
    for name, size, sha in names:
        remote.fetch(name, size, sha)
    q.put(remote.stats["downloads"])


def test_processes_of_a_node_share_one_cache_and_download_each_shard_once(s3, tmp_path):
    reader = ShardReader(s3["url"], cache=CacheOptions(str(tmp_path / "c")))
    names = [(s.name, s.bytes, s.sha256) for s in reader.manifest.shards]
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fetch_all, args=(s3["url"], str(tmp_path / "shared"), names, q))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert sum(q.get(timeout=5) for _ in procs) == len(names)


def test_a_changed_object_or_a_cut_download_is_never_used(s3, tmp_path, monkeypatch):
    reader = ShardReader(s3["url"], cache=CacheOptions(str(tmp_path / "c"),
                                                       backoff=0.01, backoff_cap=0.02))
    # a download cut off midway: retried; the partial file never appears under the shard's name
    real = reader.remote.fs.get_file
    calls = []

    def cut(rpath, lpath, **kw):
        calls.append(rpath)
        if len(calls) == 1:
            Path(lpath).write_bytes(b"half a shard")
            raise ConnectionResetError("connection reset by peer")
        return real(rpath, lpath, **kw)
    monkeypatch.setattr(reader.remote.fs, "get_file", cut)
    path = reader.tar_path(0)
    assert len(calls) == 2 and reader.remote.stats["retries"] == 1
    assert path.stat().st_size == reader.shard_entry(0).bytes
    assert not list(path.parent.glob("*.part"))
    monkeypatch.setattr(reader.remote.fs, "get_file", real)
    # an object replaced in the store by other bytes of the same size: refused, the shard counts
    # as damaged (data.strict decides), and nothing is left in the cache under its name
    entry = reader.shard_entry(1)
    data = bytearray(s3["fs"].cat_file(f"bkt/ds/{entry.name}"))
    data[600] ^= 0xFF
    s3["fs"].pipe_file(f"bkt/ds/{entry.name}", bytes(data))
    try:
        with pytest.raises(SampleError, match="sha256 .* differs from the manifest"):
            reader.tar_path(1)
        assert not (reader.directory / entry.name).exists()
        with pytest.raises(SampleError, match=r"^shard-000001.tar: sha256 .* data.strict"):
            Loader(reader, global_batch=96, workers=0, strict=True).__next__()
        lenient = Loader(reader, global_batch=96, workers=0)
        next(lenient)
        assert lenient.skipped_samples == 16  # the shard's samples replaced and counted
        lenient.close()
    finally:
        data[600] ^= 0xFF
        s3["fs"].pipe_file(f"bkt/ds/{entry.name}", bytes(data))


def test_a_full_disk_names_the_cache_folder_and_the_limit(s3, tmp_path, monkeypatch):
    import errno
    reader = ShardReader(s3["url"], cache=CacheOptions(str(tmp_path / "c"), 2.0))

    def full(rpath, lpath, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(reader.remote.fs, "get_file", full)
    with pytest.raises(CacheFull, match=r"no space left .* data.cache_limit_gb=2.0"):
        reader.remote.fetch(reader.shard_entry(0).name, reader.shard_entry(0).bytes)


@pytest.mark.slow
def test_training_from_a_bucket_equals_local_and_resumes_exactly_on_a_new_node(s3, tmp_path):
    """data.shards=s3://...: the same losses and final weights as the local folder; killed, the run
    resumes on a "new node" (an empty cache) to the very same state."""
    from tests.test_train import _kill_during, ema, losses, run_train, train_cmd
    sets = ("train.steps=12", "train.ckpt_every=4", "train.log_every=2")
    ref = run_train(s3["local"], tmp_path / "ref", *sets)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    victim = tmp_path / "victim"
    _kill_during(train_cmd(s3["url"], victim, *sets, cache), victim / "checkpoints",
                 "step_00000004", 0.2)
    assert not (victim / "checkpoints" / "step_00000012").exists()
    shutil.rmtree(tmp_path / "cache")  # resumed elsewhere: nothing cached
    res = run_train(s3["url"], victim, *sets, cache, resume="auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "cache hits" in res.stdout, res.stdout[-2000:]
    for k, v in ema(tmp_path / "ref").items():
        assert torch.equal(v, ema(victim)[k]), f"EMA {k} differs after resuming from the bucket"
    from maskdm.pipeline.tracking import read_jsonl
    rows = [r for r in read_jsonl(victim / "metrics.jsonl") if "shard_downloads" in r]
    assert rows and rows[-1]["shard_downloads"] >= 1 and "shard_cache_hit_rate" in rows[-1]
    # the DALI backend reads the same bucket to the same losses
    from maskdm.pipeline.data.dali_loader import dali_available
    if dali_available():
        dali = run_train(s3["url"], tmp_path / "dali", "train.steps=4", "data.backend=dali", cache)
        assert dali.returncode == 0, dali.stderr[-3000:]
        assert losses(dali.stdout) == losses(ref.stdout)[:2]


def test_score_references_read_from_a_bucket(s3, monkeypatch, tmp_path):
    """eval.score_ref / eval.heldout / `maskdm score --ref` take a bucket: the same images."""
    import numpy as np

    from maskdm.pipeline.eval.score import load_images
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "cache"))
    assert np.array_equal(load_images(s3["url"], 20), load_images(s3["local"], 20))


def test_a_dry_run_reads_the_remote_manifest(s3, capsys):
    from maskdm.pipeline.cli import main
    from tests.test_train import CONFIG
    assert main(["train", "--config", CONFIG, "--set", f"data.shards={s3['url']}",
                 "--dry-run"]) == 0
    assert "# data: s3://bkt/ds (32px; cached in the default cache folder)" in \
        capsys.readouterr().out
    assert main(["train", "--config", CONFIG, "--set", "data.shards=s3://bkt/nothing",
                 "--dry-run"]) == 0  # a dry run warns (twice) about what training would stop at
    assert "warning: data.shards: s3://bkt/nothing/manifest.json does not exist" in \
        capsys.readouterr().err


def test_shard_into_a_bucket_inspect_verify_and_bench_it(s3, tmp_path, monkeypatch, capsys):
    """`maskdm shard procedural s3://...` gives the bytes of a local job; interrupted (the manifest
    and two shards not uploaded), the re-run uploads only those; `inspect`, `--verify` and
    `bench data` read the bucket."""
    from maskdm.pipeline.cli import main
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    job = ["procedural", "--size", "32", "--count", "64", "--samples-per-shard", "16", "--quiet"]
    assert main(["shard", job[0], str(tmp_path / "local"), *job[1:]]) == 0
    url = "s3://bkt/up"
    assert main(["shard", job[0], url, *job[1:], "--stage", str(tmp_path / "stage"),
                 "--keep-stage"]) == 0
    assert "uploaded 9 file(s)" in capsys.readouterr().out  # 4 tars, 4 indexes, skipped.jsonl
    fs = s3["fs"]
    import json
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    remote = json.loads(fs.cat_file("bkt/up/manifest.json"))
    assert remote["shards"] == local["shards"]  # same names, sizes and sha256
    for f in sorted((tmp_path / "local").glob("shard-*")):
        assert fs.cat_file(f"bkt/up/{f.name}") == f.read_bytes()
    # killed before the end: the manifest and two shards never made it
    before = {e["name"]: e["LastModified"] for e in fs.ls("bkt/up", detail=True, refresh=True)}
    for name in ("manifest.json", "shard-000001.tar", "shard-000003.idx"):
        fs.rm_file(f"bkt/up/{name}")
    import time
    time.sleep(1.1)  # LastModified has a resolution of one second
    assert main(["shard", job[0], url, *job[1:], "--stage", str(tmp_path / "stage")]) == 0
    out = capsys.readouterr().out
    assert "uploaded 2 file(s)" in out and "(7 already there)" in out, out
    after = {e["name"]: e["LastModified"] for e in fs.ls("bkt/up", detail=True, refresh=True)}
    assert [n for n in before if before[n] != after.get(n)] == \
        ["bkt/up/manifest.json", "bkt/up/shard-000001.tar", "bkt/up/shard-000003.idx"]
    assert not (tmp_path / "stage").exists()  # removed after a complete upload
    assert main(["shard", job[0], url, *job[1:]]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["shard", job[0], url, *job[1:-3], "--samples-per-shard", "32", "--quiet"]) == 1
    assert "holds a different sharding job (samples_per_shard differ)" in capsys.readouterr().err
    assert main(["shard", job[0], "http://127.0.0.1:1/x", *job[1:]]) == 1
    assert "http:// folders are read-only" in capsys.readouterr().err
    # inspect: the summary names the URL, the preview lands here
    assert main(["inspect", url, "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert f"dataset      {url}" in out and (tmp_path / "up-preview.png").stat().st_size > 0
    # --verify downloads and checks everything; a damaged object is named
    assert main(["shard", "--verify", url, "--quiet"]) == 0
    assert "OK: s3://bkt/up: 4 shards verified" in capsys.readouterr().out
    data = bytearray(fs.cat_file("bkt/up/shard-000002.tar"))
    data[700] ^= 0xFF
    fs.pipe_file("bkt/up/shard-000002.tar", bytes(data))
    assert main(["shard", "--verify", url, "--quiet"]) == 1  # the store, not the verified copy
    assert "shard-000002.tar" in capsys.readouterr().out
    data[700] ^= 0xFF
    fs.pipe_file("bkt/up/shard-000002.tar", bytes(data))
    # bench data: cold, warm, and the local rate of the same files
    assert main(["bench", "data", url, "--batch", "16", "--workers", "0", "--step-ms", "1"]) == 0
    out = capsys.readouterr().out
    assert "remote, cold cache" in out and "warm cache / local folder:" in out
    cold, warm = [line.split() for line in out.splitlines() if line.startswith("remote,")][:2]
    assert cold[-1] == "4" and warm[-2:] == ["100%", "0"]  # downloads, then hits only


@pytest.mark.slow
def test_two_shard_jobs_into_one_prefix(s3, tmp_path):
    """Issue 35, finding 10: a second `maskdm shard` into a prefix another job is writing is
    refused, naming it (before: both said "uploaded" and the folder held a mix that --verify
    found damaged); once that job is killed -9 its lease stops moving and a new job takes the
    prefix over and completes it."""
    import signal
    import subprocess
    import sys
    import time

    from tests.netproxy import SlowLink
    link = SlowLink(s3["port"], 1e6)  # job A uploads slowly: it is still running when B starts
    url = "s3://bkt/contested"
    job = ["procedural", url, "--size", "32", "--count", "1500", "--samples-per-shard", "100",
           "--quiet", "--lease-s", "3"]
    env = {**os.environ, "MASKDM_CACHE": str(tmp_path / "cache")}
    a = subprocess.Popen([sys.executable, "-m", "maskdm", "shard", *job, "--stage",
                          str(tmp_path / "a")],
                         env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fs = s3["fs"]
        for _ in range(600):
            fs.invalidate_cache()
            if fs.exists("bkt/contested/.maskdm-lease.json"):
                break
            time.sleep(0.1)
        b = subprocess.run([sys.executable, "-m", "maskdm", "shard", *job, "--seed", "7",
                            "--stage", str(tmp_path / "b")], env=env, capture_output=True,
                           text=True, timeout=300)
        assert a.poll() is None, "job A ended before job B could meet it"
        assert b.returncode == 1, b.stdout + b.stderr
        assert f"{url} is being written by another job (maskdm shard pid {a.pid} on" in b.stderr
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
        link.close()
    c = subprocess.run([sys.executable, "-m", "maskdm", "shard", *job, "--seed", "7",
                        "--stage", str(tmp_path / "c"), "--overwrite"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-2000:]
    assert "taking over the lease of maskdm shard pid" in c.stdout
    from maskdm.pipeline.cli import main
    assert main(["shard", "--verify", url, "--quiet"]) == 0


def test_sharding_into_a_missing_bucket_says_so(s3, tmp_path, monkeypatch, capsys):
    """Issue 35, finding 13: `maskdm shard ... s3://missing-bucket/...` ended in a traceback."""
    from maskdm.pipeline.cli import main
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "cache"))
    code = main(["shard", "procedural", "s3://no-such-bucket/x", "--size", "32", "--count", "8",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and "no-such-bucket" in err and "Traceback" not in err, err
    assert "does not exist" in err
