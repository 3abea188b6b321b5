"""Outages of the object store, injected for real: servers (moto's S3 server, Python's http.server)
stopped and restarted on the same port, a socket that accepts and never answers. An outage pauses
the data, never changes it: the loader continues with the batches of the local folder, training
ends with bit-identical weights, the cache never exceeds its bound, and past the patience the run
stops cleanly and resumes exactly. Damage (bytes that differ from the manifest) is not an outage."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, shard_set

moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
pytest.importorskip("s3fs", reason="needs s3fs (the dev extra)")
pytest.importorskip("aiohttp", reason="needs aiohttp (the dev extra)")

from maskdm.pipeline.data.loader import Loader  # noqa: E402
from maskdm.shardformat.reader import ShardReader  # noqa: E402
from maskdm.shardformat.remote import CacheOptions, RemoteUnreachable  # noqa: E402


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class HttpFolder:
    """A folder served by Python's web server on 127.0.0.1, stoppable and restartable on the
    same port (its files stay where they are)."""

    def __init__(self, directory: Path):
        self.directory, self.port, self.srv = directory, 0, None

    def start(self):
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.srv = http.server.ThreadingHTTPServer(
            ("127.0.0.1", self.port), functools.partial(_Quiet, directory=str(self.directory)))
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


class MotoStore:
    """moto's S3 server on 127.0.0.1 holding ``outage/ds``; stop() and start() on the same port.
    (The server runs in this process and keeps its objects across a restart, as a real store
    does; ``upload`` puts them back where a test deletes them.)"""

    def __init__(self, local: Path):
        self.local, self.port, self.srv = local, 0, None

    def start(self):
        self.srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                                  verbose=False)
        self.srv.start()
        self.port = self.srv.get_host_and_port()[1]
        return self

    def stop(self):
        self.srv.stop()

    @property
    def env(self) -> dict:
        return dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}", AWS_ACCESS_KEY_ID="test",
                    AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")

    def fs(self):
        """A client of this server (the test has set its environment: ``aws_env``)."""
        import fsspec
        return fsspec.filesystem("s3", skip_instance_cache=True,
                                 config_kwargs={"retries": {"max_attempts": 1}})

    def upload(self):
        fs = self.fs()
        if not fs.exists("outage"):
            fs.mkdir("outage")
        for f in sorted(self.local.iterdir()):
            if f.is_file():
                fs.put_file(str(f), f"outage/ds/{f.name}")

    url = "s3://outage/ds"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """6 shards of 16 samples (32 px)."""
    return shard_set(tmp_path_factory.mktemp("outage"), "ds", count=96, samples_per_shard=16)


@pytest.fixture()
def aws_env(monkeypatch):
    def use(store: MotoStore):
        for k, v in store.env.items():
            monkeypatch.setenv(k, v)
    return use


def _shard_bytes(local: Path) -> int:
    return max(s["bytes"] for s in json.loads((local / "manifest.json").read_text())["shards"])


def _cache_size(cache: Path) -> int:
    """Shards in the cache folder, complete and being downloaded."""
    total = 0
    for p in list(cache.glob("*/*.tar")) + list(cache.glob("*/.*.part")):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and torch.equal(x.x0, y.x0)


# ---------------------------------------------------------------------------------- the loader
def test_a_server_down_for_a_while_is_waited_out_and_said_once(local, tmp_path, caplog):
    """http://: the server stops while the loader needs a shard and comes back on the same port:
    the batches are the local folder's, one line says when the wait began and one when it
    ended, and the node's outage record holds it."""
    srv = HttpFolder(local).start()
    cache = tmp_path / "cache"
    opts = CacheOptions(str(cache), CACHE_SHARDS * _shard_bytes(local) / 2 ** 30, patience_s=120,
                        timeout_s=2, backoff=0.1, backoff_cap=0.5)
    reader = ShardReader(srv.url, cache=opts)
    kw = dict(global_batch=8, seed=5, workers=0, **ORDER)
    want = _take(Loader(local, **kw), 24)  # 2 epochs: every shard downloaded twice
    loader = Loader(reader, **kw)
    got, sizes = [next(loader) for _ in range(3)], []
    srv.stop()
    caplog.set_level(logging.WARNING, logger="maskdm.data")

    def rest():
        got.extend(next(loader) for _ in range(21))
    t = threading.Thread(target=rest)
    t.start()
    deadline = time.time() + 60
    while reader.remote.stats["retries"] < 3 and time.time() < deadline:
        sizes.append(_cache_size(cache))
        time.sleep(0.05)
    assert t.is_alive(), "the loader did not wait for the store"
    srv.start()
    while t.is_alive():
        sizes.append(_cache_size(cache))
        time.sleep(0.05)
    t.join()
    loader.close()
    srv.stop()
    _same(got, want)
    lines = [r.getMessage() for r in caplog.records]
    began = [m for m in lines if m.startswith(f"waiting for {srv.url.rstrip('/')} since")]
    ended = [m for m in lines if "reachable again after" in m]
    assert len(began) == 1 and len(ended) == 1, lines
    assert "data.remote_patience_s" in began[0]
    down, outages = reader.remote.patience.unreachable_seconds(0)
    assert outages == 1 and down > 0
    assert max(sizes) <= opts.limit_bytes + _shard_bytes(local)


def test_a_stalled_connection_times_out_and_the_loader_continues(local, tmp_path):
    """A socket that accepts connections and never answers takes the server's port: every
    request times out (data.remote_timeout_s) and is retried; when a real server takes the port
    again the loader continues with the right batches."""
    srv = HttpFolder(local).start()
    cache = tmp_path / "cache"
    opts = CacheOptions(str(cache), CACHE_SHARDS * _shard_bytes(local) / 2 ** 30, patience_s=120,
                        timeout_s=3, backoff=0.1, backoff_cap=0.3)
    reader = ShardReader(srv.url, cache=opts)
    kw = dict(global_batch=8, seed=2, workers=0, **ORDER)
    want = _take(Loader(local, **kw), 14)
    loader = Loader(reader, **kw)
    got = [next(loader)]
    srv.stop()
    stall = socket.socket()
    stall.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stall.bind(("127.0.0.1", srv.port))
    stall.listen(64)  # the kernel accepts; nobody reads or answers
    t = threading.Thread(target=lambda: got.extend(next(loader) for _ in range(13)))
    t.start()
    deadline = time.time() + 60
    while reader.remote.stats["retries"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert reader.remote.stats["retries"] >= 2 and t.is_alive()
    stall.close()
    srv.start()
    t.join(120)
    assert not t.is_alive(), "the loader hung on a stalled connection"
    loader.close()
    srv.stop()
    _same(got, want)
    assert _cache_size(cache) <= opts.limit_bytes + _shard_bytes(local)


def test_an_object_missing_for_a_while_is_waited_for_and_past_the_patience_stops(
        local, tmp_path, aws_env):
    """s3://: a listed shard deleted from the bucket and put back is waited for (an outage, not
    damage); a store gone for longer than the patience raises RemoteUnreachable (which stops
    training), never a damaged shard."""
    store = MotoStore(local).start()
    aws_env(store)
    store.upload()
    fs = store.fs()
    reader = ShardReader(store.url, cache=CacheOptions(str(tmp_path / "c"), patience_s=60,
                                                       backoff=0.05, backoff_cap=0.2))
    name = reader.shard_entry(0).name
    fs.rm_file(f"outage/ds/{name}")
    got = []
    t = threading.Thread(target=lambda: got.append(reader.tar_path(0)))
    t.start()
    deadline = time.time() + 30
    while reader.remote.stats["retries"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert t.is_alive()
    fs.put_file(str(local / name), f"outage/ds/{name}")
    t.join(60)
    assert got and got[0].read_bytes() == (local / name).read_bytes()
    # past the patience: unreachable, named with the patience setting
    impatient = ShardReader(store.url, cache=CacheOptions(str(tmp_path / "i"), patience_s=1.5,
                                                          backoff=0.05, backoff_cap=0.2))
    store.stop()
    try:
        with pytest.raises(RemoteUnreachable, match=r"unreachable since .*longer than "
                                                    r"data.remote_patience_s=1.5"):
            impatient.tar_path(1)
        with pytest.raises(RemoteUnreachable):  # through the loader too, not a replaced sample
            next(Loader(impatient, global_batch=8, workers=0))
    finally:
        store.start()


@pytest.mark.slow
def test_a_same_size_corrupted_object_is_damage_and_quick_verify_says_what_it_checked(
        local, tmp_path, aws_env, monkeypatch, capsys):
    from maskdm.pipeline.cli import main
    store = MotoStore(local).start()
    aws_env(store)
    store.upload()
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "cache"))
    fs = store.fs()
    data = bytearray((local / "shard-000002.tar").read_bytes())
    data[:4096] = bytes(4096)  # zeroed, same size
    fs.pipe_file("outage/ds/shard-000002.tar", bytes(data))
    assert main(["shard", "--verify", "--quick", store.url, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "checksums, counts" not in out and "checksums were not compared" in out, out
    assert "sizes, counts and indexes in the bucket" in out
    assert main(["shard", "--verify", store.url, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"shard-000002.tar: sha256 mismatch (its contents in the bucket {store.url}" in out
    assert "on disk" not in out
    # training reads it as damage (data.strict decides), named with the bucket
    from tests.test_train import _env, run_train
    env = {**_env(), **store.env}
    r = run_train(store.url, tmp_path / "run", "train.steps=12", "train.ckpt_every=12",
                  f"data.cache_dir={tmp_path / 'c'}", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"changed or damaged in the bucket {store.url}" in r.stderr, r.stderr[-3000:]
    assert f"run `maskdm shard --verify {store.url}`" in r.stdout, r.stdout[-2000:]
    store.stop()


# ---------------------------------------------------------------------------------- training
# the partitioned order, with a cache that holds 4.5 of the 6 shards: two partitions of three
# shards, each needing its window of one shard and one shard downloaded ahead (4 at once)
ORDER = dict(partitions=2, window=1, lookahead=1)
CACHE_SHARDS = 4.5
OUTAGE_SETS = ("train.steps=36", "train.ckpt_every=12", "train.log_every=1", "data.workers=2",
               "data.partitions=2", "data.shuffle_window=1", "data.cache_lookahead=1",
               "data.remote_timeout_s=3")


def _steps_done(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(ln)["step"] for ln in lines if ln.strip().endswith("}")]
    return max(steps, default=0)


def _run_with_outage(cmd, env, run_dir, cache, stop, start, *, at_step=6, down_s=8.0,
                     wait_for_exit=False):
    """Start training; when it reaches ``at_step`` call ``stop()``, after ``down_s`` seconds
    ``start()``. -> (completed process, cache sizes sampled meanwhile)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sizes, stopped_at = [], None
    out = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"),
                                                            proc.communicate())))
    reader.start()
    deadline = time.time() + 500
    try:
        while proc.poll() is None and time.time() < deadline:
            sizes.append(_cache_size(cache))
            if stopped_at is None and _steps_done(run_dir) >= at_step:
                stop()
                stopped_at = time.time()
            if stopped_at is not None and start is not None and \
                    time.time() - stopped_at >= down_s:
                start()
                start = None
            time.sleep(0.05)
        assert stopped_at is not None, "training ended before the outage"
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(60)
        if start is not None and not wait_for_exit:
            start()
    return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""),
                                       out.get("stderr", "")), sizes


@pytest.fixture(scope="module")
def reference(local, tmp_path_factory):
    """The uninterrupted run, from the local folder."""
    from tests.test_train import ema, run_train
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = run_train(local, run_dir, *OUTAGE_SETS)
    assert r.returncode == 0, r.stderr[-3000:]
    return ema(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["s3", "http"])
def test_training_through_an_outage_ends_bit_identical(local, reference, tmp_path, kind, aws_env):
    """The store stops at step 6 and comes back 8 s later on the same port: the run pauses (two
    lines say when), continues, and its final weights equal the uninterrupted run's bit for bit;
    the cache never holds more than its limit plus the one shard being downloaded."""
    from tests.test_train import _env, ema, train_cmd
    store = MotoStore(local).start() if kind == "s3" else HttpFolder(local).start()
    env = _env()
    if kind == "s3":
        env.update(store.env)
        aws_env(store)
        store.upload()
    limit = CACHE_SHARDS * _shard_bytes(local)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = train_cmd(store.url, run_dir, *OUTAGE_SETS, f"data.cache_dir={cache}",
                    f"data.cache_limit_gb={limit / 2 ** 30}", "data.remote_patience_s=300")
    r, sizes = _run_with_outage(cmd, env, run_dir, cache, store.stop, store.start)
    store.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    began = [ln for ln in r.stderr.splitlines() if ln.startswith("waiting for ")]
    ended = [ln for ln in r.stderr.splitlines() if "reachable again after" in ln]
    assert len(began) == 1 and len(ended) == 1, r.stderr[-3000:]
    weights = ema(run_dir)
    for k, v in reference.items():
        assert torch.equal(v, weights[k]), f"{k} differs from the uninterrupted run"
    assert max(sizes) <= limit + _shard_bytes(local)
    from maskdm.pipeline.tracking import read_jsonl
    rows = [x for x in read_jsonl(run_dir / "metrics.jsonl") if "store_unreachable_s" in x]
    assert rows[-1]["store_unreachable_s"] >= 4 and rows[-1]["store_outages"] == 1


@pytest.mark.slow
def test_past_the_patience_the_run_stops_and_resumes_exactly(local, reference, tmp_path):
    """The store stays away longer than data.remote_patience_s: the run stops with exit code 4
    and a message naming the last good checkpoint; `--resume auto` once the store is back ends
    with the uninterrupted run's weights."""
    from tests.test_train import _env, ema, run_train, train_cmd
    store = HttpFolder(local).start()
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    limit = CACHE_SHARDS * _shard_bytes(local)
    sets = (*OUTAGE_SETS, f"data.cache_dir={cache}", f"data.cache_limit_gb={limit / 2 ** 30}")
    cmd = train_cmd(store.url, run_dir, *sets, "data.remote_patience_s=4")
    r, _ = _run_with_outage(cmd, _env(), run_dir, cache, store.stop, None, at_step=14,
                            wait_for_exit=True)
    assert r.returncode == 4, (r.returncode, r.stderr[-3000:])
    assert "longer than data.remote_patience_s=4" in r.stderr
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert f"the last good checkpoint: {last}" in r.stderr
    assert "`--resume auto` continues exactly" in r.stderr
    store.start()
    res = run_train(store.url, run_dir, *sets, resume="auto")
    store.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    weights = ema(run_dir)
    for k, v in reference.items():
        assert torch.equal(v, weights[k]), f"{k} differs from the uninterrupted run"


def test_an_outage_record_left_by_a_dead_process_neither_counts_nor_delays(tmp_path):
    """A process that died mid-outage leaves `.outage.json`; once its heartbeat is stale it is
    not an ongoing outage (a resumed run's patience starts afresh), and the next successful
    request closes it at its last heartbeat, not now."""
    from maskdm.shardformat.patience import OUTAGE, OUTAGES, Patience, StoreOptions
    p = Patience("s3://b/x", StoreOptions(patience_s=5, timeout_s=1, backoff_cap=1), tmp_path)
    record = tmp_path / OUTAGE
    record.write_text(json.dumps({"url": "s3://b/x", "since": time.time() - 3600}))
    beat = time.time() - 3000
    os.utime(record, (beat, beat))
    assert p.unreachable_seconds(time.time() - 60) == (0, 0)
    assert p.call(lambda: 42, "x") == 42
    assert not record.exists()
    (closed,) = [json.loads(ln) for ln in (tmp_path / OUTAGES).read_text().splitlines()]
    assert closed["until"] == pytest.approx(beat, abs=1)
    # a real failure after that waits with a fresh patience, then gives up naming the setting
    calls = []

    def refused():
        calls.append(time.time())
        raise ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(RemoteUnreachable, match="data.remote_patience_s=5"):
        p.call(refused, "shard-000000.tar")
    assert len(calls) >= 3 and calls[-1] - calls[0] >= 4.9  # the whole patience, then one more try


def test_what_is_not_an_outage_is_never_retried(tmp_path):
    from maskdm.shardformat.patience import Patience, RemoteError
    p = Patience("s3://b/x", state_dir=tmp_path)
    for error, expected in ((PermissionError("AccessDenied"), RemoteError),
                            (FileNotFoundError("NoSuchKey"), FileNotFoundError),
                            (TypeError("a bug"), TypeError)):
        calls = []

        def fail(e=error):
            calls.append(1)
            raise e
        with pytest.raises(expected):
            p.call(fail, "x")
        assert len(calls) == 1, error
