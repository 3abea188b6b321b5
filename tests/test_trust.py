"""What a bucket, a run folder or a shard folder written by someone else can do to the machine
that reads it (issue 35): names read from them never reach outside their folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import shard_set


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("trust"), "s", count=20, samples_per_shard=10)


@pytest.fixture()
def denying_server():
    """A web server on 127.0.0.1 that answers 403 to every GET and HEAD -> "127.0.0.1:PORT"."""
    import http.server
    import threading

    class Deny(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


# ------------------------------------------------------------------ names in a shard manifest
@pytest.mark.parametrize("bad", ["../outside.tar", "/tmp/outside.tar", "sub/shard.tar", ".."])
def test_a_manifest_naming_files_outside_its_folder_is_refused(small, tmp_path, bad, capsys):
    from maskdm.pipeline.cli import main
    from maskdm.shardformat.manifest import DatasetError
    from maskdm.shardformat.reader import ShardReader
    shards = tmp_path / "copy"
    shutil.copytree(small, shards)
    (tmp_path / "outside.tar").write_bytes((shards / "shard-000000.tar").read_bytes())
    m = json.loads((shards / "manifest.json").read_text())
    m["shards"][0]["name"] = bad
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"shard name .* is not a plain file name"):
        ShardReader(shards)
    for cmd in (["inspect", str(shards)], ["shard", "--verify", str(shards)]):
        assert main(cmd) != 0
        err = capsys.readouterr()
        assert "is not a plain file name" in err.out + err.err


# ------------------------------------------------------------------ names in a commit record
@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the dev extra)")
    from tests.test_store_outages import MotoStore
    store = MotoStore(tmp_path).start()
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "cache" / "shards"))
    fs = store.fs()
    if not fs.exists("runs"):
        fs.mkdir("runs")
    yield fs
    store.stop()


@pytest.mark.parametrize("bad", ["ema_rank/../../../../{target}", "{target}"])
def test_a_commit_record_naming_files_outside_the_run_is_refused(bucket, tmp_path, bad, capsys):
    """A bucket's COMMITTED.json with a name that climbs out of the checkpoint folder: export
    (and everything that reads a bucket's checkpoint) stops naming it and writes nothing there."""
    from maskdm.pipeline.cli import main
    target = tmp_path / "escaped"
    name = bad.format(target=str(target).lstrip("/") if bad.startswith("ema") else target)
    run = "runs/evil"
    bucket.pipe(f"{run}/checkpoints/step_00000001/meta.json", b"{}")
    bucket.pipe(f"{run}/checkpoints/step_00000001/{name.lstrip('/')}", b"pwn")
    record = {"files": {"meta.json": 2, name: 3}, "world_size": 1, "time": 1.0}
    bucket.pipe(f"{run}/checkpoints/step_00000001/COMMITTED.json", json.dumps(record).encode())
    assert main(["export", f"s3://{run}", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a plain file name" in err and "refusing to write outside" in err, err
    assert not target.exists()
    assert not list(Path("/tmp").glob("escaped"))


# ------------------------------------------------------------------ credentials and mlflow.json
def test_sync_sends_no_credentials_to_a_server_named_only_by_the_folder(tmp_path, monkeypatch,
                                                                        capsys):
    """A run folder from someone else whose mlflow.json names their server: `maskdm sync` with
    MLFLOW_TRACKING_TOKEN set refuses before sending anything (before: the bearer token reached
    the folder's server); naming that server with --uri is the user's choice."""
    import http.server
    import threading

    from maskdm.pipeline.cli import main
    seen = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        run = tmp_path / "theirs"
        run.mkdir()
        (run / "mlflow.json").write_text(json.dumps({"uri": url, "run_id": "abc",
                                                      "metrics_sent": 0}))
        (run / "metrics.jsonl").write_text("")
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret-token")
        assert main(["sync", str(run)]) == 2
        err = capsys.readouterr().err
        assert "go only to a server you name" in err and "--uri" in err, err
        assert "secret-token" not in err and seen == []
        main(["sync", str(run), "--uri", url])  # named: the user's choice (404: not MLflow)
        assert seen and seen[0] == "Bearer secret-token"
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------ one job per run folder
@pytest.mark.slow
def test_a_fresh_run_into_a_used_folder_and_a_second_job_are_refused(small, tmp_path):
    """Issue 35, findings 8 and 9: a run without --resume into a folder holding another run's
    checkpoints is refused (before: its pruning deleted the new run's checkpoints and a later
    --resume auto continued the old run); a second job on a folder in use is refused, naming
    the holder (before: both exited 0 and the folder mixed their checkpoints and metrics)."""
    import subprocess
    import time

    from tests.test_train import _env, run_train, train_cmd
    run = tmp_path / "run"
    first = run_train(small, run, "train.steps=3", "optim.lr=1e-3")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    again = run_train(small, run, "train.steps=3", "optim.lr=2e-3")
    assert again.returncode == 2
    assert "already holds a run (newest checkpoint step_00000003): `--resume auto` continues it" \
        in again.stderr, again.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # a long job holds the folder; a second one is refused while it runs
    busy = tmp_path / "busy"
    proc = subprocess.Popen(train_cmd(small, busy, "train.steps=100000", "train.ckpt_every=100000"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = busy / ".maskdm.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text().startswith("pid"):
                break
            time.sleep(0.1)
        second = run_train(small, busy, "train.steps=3", resume="auto")
        assert second.returncode == 2
        assert f"is in use by another `maskdm train` (pid {proc.pid} on" in second.stderr, \
            second.stderr[-2000:]
    finally:
        proc.kill()
        proc.wait()
    third = run_train(small, busy, "train.steps=3", resume="auto")  # the lock went with it
    assert third.returncode == 0, third.stderr[-3000:]


# ------------------------------------------------------------------ credentials inside URLs
@pytest.mark.slow
def test_credentials_inside_urls_are_written_nowhere(small, tmp_path):
    """Issue 35, finding 4: a tracked run with a password in its MLflow URI and in its shard URL
    (a real MLflow server, Python's web server for the shards) writes neither password to the
    run folder (config, meta, export, mlflow.json, metrics), the MLflow store (params,
    artifacts), the shard cache (folder names, SOURCE) or its console."""
    import functools
    import http.server
    import subprocess
    import sys
    import threading

    pytest.importorskip("aiohttp", reason="needs aiohttp (the dev extra)")
    from tests.test_tracking import Server
    from tests.test_train import ROOT, _env, train_cmd

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Quiet, directory=str(small)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    (tmp_path / "mlflow").mkdir()
    server = Server(tmp_path / "mlflow")
    try:
        shards = f"http://bob:hunter2@127.0.0.1:{web.server_address[1]}/"
        uri = server.uri.replace("http://", "http://alice:s3cret@")
        run = tmp_path / "run"
        cmd = train_cmd(shards, run, "train.steps=3", "tracking.enabled=true",
                        f"tracking.uri={uri}", f"data.cache_dir={tmp_path / 'cache'}")
        env = _env()
        env.pop("MLFLOW_TRACKING_URI", None)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "alice:***@" in (run / "config.yaml").read_text()
        # doctor reaches the server with the URI's credentials (before: FAIL) and shows none
        doc = subprocess.run([sys.executable, "-m", "maskdm", "doctor", "--config",
                              str(ROOT / "configs" / "test_tiny.yaml"), "--set",
                              f"data.shards={shards}", "--set", "tracking.enabled=true",
                              "--set", f"tracking.uri={uri}", "--set",
                              f"data.cache_dir={tmp_path / 'cache'}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        line = next(ln for ln in doc.stdout.splitlines() if "mlflow" in ln)
        assert "OK" in line and "alice:***@" in line, doc.stdout[-2000:]
        r = subprocess.CompletedProcess(cmd, 0, r.stdout + doc.stdout, r.stderr + doc.stderr)
        for secret in ("hunter2", "s3cret"):
            assert secret not in r.stdout + r.stderr
            for root in (run, tmp_path / "mlflow", tmp_path / "cache"):
                for p in root.rglob("*"):
                    assert secret not in p.name, p
                    if p.is_file():
                        assert secret.encode() not in p.read_bytes(), p
    finally:
        server.stop()
        web.shutdown()
        web.server_close()


@pytest.mark.parametrize("url,shown", [
    ("http://alice:s3cret@host:5000/x", "http://alice:***@host:5000/x"),
    ("https://TOKEN@host/x", "https://***@host/x"),
    ("s3://bucket/shards", "s3://bucket/shards"),
    ("https://h/x?X-Amz-Signature=abc&part=1&access_token=t", "https://h/x?X-Amz-Signature=***&part=1&access_token=***"),
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
    ("see http://a:b@h:1 and gs://c/d", "see http://a:***@h:1 and gs://c/d"),
])
def test_redact_url(url, shown):
    from maskdm.shardformat.fsutil import redact_tree, redact_url
    assert redact_url(url) == shown
    assert redact_tree({"a": [url, 3], "b": None}) == {"a": [shown, 3], "b": None}


# ------------------------------------------------------------------ ports a plain run opens
def test_a_single_process_run_listens_on_no_network_interface(tmp_path):
    """torch's env:// rendezvous serves its unauthenticated TCP store on every interface; a
    world of one keeps its store in the process, and gloo binds only the loopback."""
    pytest.importorskip("psutil")
    import ipaddress
    import os
    import subprocess
    import sys
    script = tmp_path / "listen.py"
    script.write_text(
        "import psutil, torch\n"
        "from maskdm.pipeline import dist\n"
        "dist.init(dist.setup_env('cpu'))\n"
        "t = torch.ones(1); torch.distributed.all_reduce(t); assert t.item() == 1\n"
        "for c in psutil.Process().net_connections(kind='inet'):\n"
        "    if c.status == psutil.CONN_LISTEN: print('LISTEN', c.laddr.ip)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "GLOO_SOCKET_IFNAME") and not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    listening = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("LISTEN")]
    assert all(ipaddress.ip_address(ip).is_loopback for ip in listening), listening


# ------------------------------------------------------------------ scratch and cache folders
needs_root = pytest.mark.skipif(not hasattr(__import__("os"), "geteuid")
                                or __import__("os").geteuid() != 0,
                                reason="making a folder another user owns needs root")


@needs_root
def test_scratch_and_cache_folders_another_user_owns_are_refused(tmp_path, monkeypatch):
    """On a shared machine whoever creates a folder first under /tmp could plant files that a run
    trusts (a cached checkpoint file of the right size is not downloaded again)."""
    import os
    import tempfile

    from maskdm.pipeline.config import ConfigError
    from maskdm.pipeline.train import private_scratch, scratch_root
    from maskdm.shardformat.manifest import DatasetError
    from maskdm.shardformat.remote import CacheOptions, RemoteShards
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4321, 4321)
    with pytest.raises(ConfigError, match=r"belongs to another user \(uid 4321\).*"
                                          r"train\.scratch_dir"):
        private_scratch(str(theirs), "s3://b/run")
    # the default: $TMPDIR/maskdm-<uid>, pre-created by someone else
    root = scratch_root()
    root.mkdir()
    os.chown(root, 4321, 4321)
    with pytest.raises(ConfigError, match="belongs to another user"):
        private_scratch(None, "s3://b/run")
    os.rmdir(root)
    root.symlink_to(theirs)  # or a link to a folder of theirs
    with pytest.raises(ConfigError, match="is a link or not a folder"):
        private_scratch(None, "s3://b/run")
    root.unlink()
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)  # ours but open to all: made private
    got = private_scratch(None, "s3://b/run")
    assert got.is_relative_to(root) and root.stat().st_mode & 0o777 == 0o700
    assert got.stat().st_mode & 0o077 == 0
    # a shard cache folder (data.cache_dir / MASKDM_CACHE) of another user
    cache = tmp_path / "cache"
    cache.mkdir()
    first = RemoteShards("http://127.0.0.1:9/shards", CacheOptions(str(cache)))
    os.chown(first.dir, 4321, 4321)
    with pytest.raises(DatasetError, match="belongs to another user.*data.cache_dir"):
        RemoteShards("http://127.0.0.1:9/shards", CacheOptions(str(cache)))


# ------------------------------------------------------------------ one writer per bucket folder
def _memory_lease(store: dict, what: str, ttl: float):
    from maskdm.shardformat.lease import Lease
    return Lease("s3://b/run", what, lambda: store.get("lease"),
                 lambda rec: store.__setitem__("lease", rec), lambda: store.pop("lease", None),
                 ttl_s=ttl, settle_s=0.05)


def test_a_lease_refuses_a_live_holder_and_takes_over_a_dead_one():
    from maskdm.shardformat.lease import LeaseHeld, LeaseLost
    store, said = {}, []
    a = _memory_lease(store, "job A", 1.2)
    a.acquire(said.append)
    b = _memory_lease(store, "job B", 1.2)
    with pytest.raises(LeaseHeld, match=r"being written by another job \(job A pid"):
        b.acquire(said.append)  # A renews while B watches
    assert "watching it for 1 s" in said[-1]
    a.release()
    assert "lease" not in store
    b.acquire(said.append)  # released: taken at once
    assert store["lease"]["what"] == "job B"
    b._stop.set()  # B dies without releasing (killed -9): its lease stops moving
    b._thread.join()
    c = _memory_lease(store, "job C", 1.2)
    c.acquire(said.append)
    assert said[-1].startswith("taking over the lease of job B") and "not renewed in 1 s" \
        in said[-1]
    # C is taken over behind its back (a job that ignored the lease): C stops at its next check
    store["lease"] = {**store["lease"], "token": "other", "what": "job D"}
    for _ in range(100):
        if c.lost:
            break
        __import__("time").sleep(0.05)
    with pytest.raises(LeaseLost, match=r"taken over by another job \(job D pid"):
        c.check()
    c.release()
    assert store["lease"]["token"] == "other"  # not ours: left alone
    # a lease written by someone else is only shown, clipped, with URL credentials redacted
    store["lease"] = {"token": "x", "what": "https://u:secret@h/" + "y" * 500, "beat": 0}
    d = _memory_lease(store, "job E", 0.3)
    d.acquire(said.append)
    assert "secret" not in said[-1] and len(said[-1]) < 400
    d.release()


@pytest.mark.slow
def test_two_jobs_on_one_run_folder_in_a_bucket(small, bucket, tmp_path):
    """Issue 35, finding 8 for a run folder in a bucket (nodes share nothing but the bucket, so
    the local lock cannot see the other job): the second job is refused while the first runs,
    naming it; the first finishes and releases the lease; a job resuming after a holder was
    killed -9 takes the lease over once it has stopped moving."""
    import os
    import subprocess
    import time

    from tests.test_train import _env, run_train, train_cmd
    url = "s3://runs/shared"
    env = {**_env(), **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    proc = subprocess.Popen(train_cmd(small, url, "train.steps=100000", "train.ckpt_every=4",
                                      f"train.scratch_dir={tmp_path / 'a'}"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if bucket.exists("runs/shared/checkpoints"):
                break
            time.sleep(0.1)
        second = run_train(small, url, "train.steps=3", f"train.scratch_dir={tmp_path / 'b'}",
                           resume="auto", env=env)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{url} is being written by another job (maskdm train pid {proc.pid} on" \
            in second.stderr, second.stderr[-2000:]
    finally:
        proc.kill()  # -9: its lease stays behind
        proc.wait()
    assert bucket.exists("runs/shared/.maskdm-lease.json")
    third = run_train(small, url, "train.steps=8", f"train.scratch_dir={tmp_path / 'c'}",
                      resume="auto", env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the lease of maskdm train pid" in third.stdout
    bucket.invalidate_cache()
    assert not bucket.exists("runs/shared/.maskdm-lease.json")  # released at the end


# ------------------------------------------------------------------ downloads have size caps
def test_a_store_that_streams_without_end_is_refused_at_the_listed_size(small, tmp_path):
    """Issue 35, finding 11: an http(s) store that answers HEAD with the right size but streams
    a file without end. Before: a 2 KB index came down as hundreds of MB, was called an outage
    and downloaded again on every retry for the whole patience. Now the download stops one
    chunk past the size it may have, once, as a damaged object (no retry); the same for a
    manifest past its cap."""
    pytest.importorskip("aiohttp", reason="needs aiohttp (the dev extra)")
    import functools
    import http.server
    import threading

    from maskdm.shardformat import remote
    from maskdm.shardformat.reader import ShardReader
    sent = {"bytes": 0, "gets": 0}
    endless = {"shard-000000.idx"}

    class Hostile(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            if name not in endless:
                return super().do_GET()
            sent["gets"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()  # no length: the body ends when the connection does
            try:
                while sent["bytes"] < 2 ** 30:
                    self.wfile.write(b"\0" * 65536)
                    sent["bytes"] += 65536
            except OSError:
                pass  # the client hung up
            self.close_connection = True
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Hostile, directory=str(small)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    try:
        from maskdm.shardformat.remote import CacheOptions
        reader = ShardReader(url, cache=CacheOptions(str(tmp_path / "cache"), patience_s=600,
                                                     backoff=0.01, backoff_cap=0.02))
        import re
        assert re.search(r"shard-000000.idx: the store sent at least \d+ bytes, more than the "
                         r"\d+ it may hold", reader.excluded["shard-000000.tar"]), reader.excluded
        assert len(reader.excluded) == 1  # the shard is left out, as a damaged one
        assert sent["gets"] == 1 and reader.remote.stats["retries"] == 0
        assert sent["bytes"] < 64 * 2 ** 20, sent
        assert not list((tmp_path / "cache").rglob("*.part"))
        # a manifest without end: refused past the small-file cap (lowered here to 1 MiB)
        endless.add("manifest.json")
        old = remote.SMALL_FILE_MAX
        remote.SMALL_FILE_MAX = 2 ** 20
        try:
            with pytest.raises(Exception, match="more than 1048576 bytes"):
                ShardReader(url, cache=CacheOptions(str(tmp_path / "cache2"), patience_s=600,
                                                    backoff=0.01, backoff_cap=0.02))
        finally:
            remote.SMALL_FILE_MAX = old
    finally:
        srv.shutdown()


# ------------------------------------------------------------------ what a worker reads and decodes
def test_sources_are_checked_for_size_and_pixel_format_before_they_are_read_or_decoded(tmp_path):
    """Issue 35, finding 12: a huge file named .jpg, a zip member that inflates past the cap, an
    image whose pixel format needs more memory than --max-pixels allows, and a JPEG in a jpeg
    shard with another size than the shard's: each is refused before it is read or decoded."""
    import io
    import types
    import zipfile

    import numpy as np
    from PIL import Image

    from maskdm.pipeline.data.torch_loader import decode_sample
    from maskdm.preprocessing.images import Skip, prepare, read_file
    from maskdm.preprocessing.sources import Item, ItemLoader
    from maskdm.shardformat.reader import SampleError
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(3 * 2 ** 30)  # 3 GiB, sparse: read whole before, 2.1 GB per worker
    with pytest.raises(Skip, match=r"file of 3072 MiB is larger than --max-file-mb 256"):
        read_file(str(big))
    zpath = tmp_path / "faces.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", b"\0" * (3 * 2 ** 20))  # 3 MiB inflated from a few KB
    loader = ItemLoader("celebahq", str(zpath), 0, 32)
    with pytest.raises(Skip, match=r"file of 3 MiB is larger than --max-file-mb 1"):
        loader.load(Item("a.png", 0), max_bytes=2 ** 20)
    # --max-pixels also bounds decode memory: RGBA takes ~5x the bytes of RGB per pixel
    rgba = io.BytesIO()
    Image.new("RGBA", (1000, 1000)).save(rgba, format="PNG")
    with pytest.raises(Skip, match=r"1000x1000 pixels of mode RGBA would take about 19 MiB to "
                                   r"decode, more than --max-pixels 1,000,000 allows \(8 MiB\)"):
        prepare(rgba.getvalue(), 32, max_pixels=1_000_000)
    sixteen = io.BytesIO()
    Image.fromarray(np.full((1000, 1000), 40000, np.uint16)).save(sixteen, format="PNG")
    out = prepare(sixteen.getvalue(), 32, max_pixels=1_000_000)  # 16-bit grey fits: converted
    assert out.image.shape == (32, 32, 3) and int(out.image[0, 0, 0]) == round(40000 * 255 / 65535)
    # a JPEG whose header says 13000x13000 inside a 32px jpeg shard: refused from its header
    jpg = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(jpg, format="JPEG")
    data = bytearray(jpg.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (13000).to_bytes(2, "big") * 2
    reader = types.SimpleNamespace(encoding="jpeg", image_size=32)
    with pytest.raises(SampleError, match="jpg is 13000x13000, expected 32x32"):
        decode_sample(reader, "k", {"jpg": bytes(data), "json": b"{}"})


# ------------------------------------------------------------------ smaller findings (13)
def test_a_skipped_file_reached_through_a_link_leaves_none_of_its_bytes(tmp_path):
    import json
    import os

    from PIL import Image

    from maskdm.preprocessing.procedural import render
    from maskdm.preprocessing.shard_job import ShardOptions, run
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(render(1, i, 48)).save(src / f"face{i}.png")
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:secret-hash:/root:/bin/sh\n")
    os.symlink(secret, src / "link.jpg")
    out = tmp_path / "out"
    run(ShardOptions(src=str(src), out=str(out), source="folder", size=32, workers=1),
        progress=False, log=lambda *a: None)
    text = (out / "skipped.jsonl").read_text()
    rec = json.loads(text)
    assert rec["src"] == "link.jpg" and rec["reason"].startswith("not an image"), rec
    assert "root" not in text and "secret" not in text


def test_an_export_is_one_pair_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Issue 35, finding 13: the weights and config.json are renamed separately; a crash between
    the two renames left a mismatched pair (now refused, naming the fix), and a failed export
    left `.model.safetensors.tmp` behind (now nothing)."""
    import os
    import shutil

    from maskdm.pipeline import checkpoint as ckpt
    from maskdm.pipeline import export
    from tests.test_train import run_train
    from tests.conftest import shard_set
    shards = shard_set(tmp_path, "s", count=16, samples_per_shard=8)
    r = run_train(shards, tmp_path / "run", "train.steps=2", "train.ckpt_every=1",
                  "train.keep_last=2")
    assert r.returncode == 0, r.stderr[-2000:]
    step1 = tmp_path / "run" / "checkpoints" / "step_00000001"
    out = tmp_path / "exp"
    export.export_weights(step1, out)
    weights, _, conf = export.load_export(out)
    assert conf["step"] == 1 and len(conf["export_id"]) == 16
    keep = out / "old.safetensors"
    shutil.copy(out / "model.safetensors", keep)
    # a crash between the two renames: the new weights are in place, the old config stays
    real = os.replace

    def crash(a, b):
        real(a, b)
        if str(b).endswith("model.safetensors"):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_weights(tmp_path / "run" / "checkpoints" / "step_00000002", out)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(ckpt.CheckpointError, match="belong to different exports"):
        export.load_export(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "old.safetensors"]
    # a failed write (a full disk) leaves no temporary file either
    from safetensors import torch as st

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError):
        export.export_weights(step1, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ stop at once, with one line
def test_no_credentials_and_access_denied_stop_at_once_on_every_store_path(
        bucket, small, tmp_path, monkeypatch, denying_server):
    """What the docs promise: without usable credentials, or denied, a store request fails at
    once with one line naming the store and the fix, never a wait of data.remote_patience_s
    (here 1800 s): the shard cache, a run folder in a bucket, a checkpoint read from one, and a
    shard upload."""
    from maskdm.pipeline.runstore import RunStore, fetch_weights
    from maskdm.preprocessing.shard_job import ShardJobError, ShardOptions
    from maskdm.preprocessing.upload import run_remote
    from maskdm.shardformat.patience import RemoteError, StoreOptions
    from maskdm.shardformat.remote import CacheOptions, RemoteShards
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    patient = StoreOptions(patience_s=1800)
    no_creds = r"no usable credentials for s3://runs/\w+ .*AWS_ACCESS_KEY_ID"
    shards = RemoteShards("s3://runs/ds", CacheOptions(str(tmp_path / "c"), patience_s=1800))
    with pytest.raises(RemoteError, match=no_creds):
        shards.listing()
    assert shards.stats["retries"] == 0
    store = RunStore("s3://runs/job", tmp_path / "scratch", patient)
    with pytest.raises(RemoteError, match=no_creds):
        store.newest()
    assert store.bucket.patience.retries == 0
    with pytest.raises(RemoteError, match=no_creds):
        fetch_weights("s3://runs/job", patient)
    with pytest.raises(ShardJobError, match=no_creds):
        run_remote(ShardOptions(src="", out="", source="procedural", size=32, count=8,
                                workers=1), "s3://runs/up", stage=str(tmp_path / "stage"),
                   progress=False, log=lambda *a: None, store=patient)
    # denied: a web server that answers 403 to everything
    url = f"http://{denying_server}/ds"
    denied = RemoteShards(url, CacheOptions(str(tmp_path / "d"), patience_s=1800))
    with pytest.raises(RemoteError, match=r"access to http://127.0.0.1:\d+/ds denied"):
        denied.read_text("manifest.json")
    with pytest.raises(RemoteError, match=r"access to http://127.0.0.1:\d+/ds denied"):
        denied.listing()
    assert denied.stats["retries"] == 0


def test_a_disk_that_fills_during_a_download_stops_naming_the_folder(bucket, tmp_path):
    """What the docs promise, on every path through the store's retry layer that downloads: the
    shard cache, and a run folder's (or checkpoint's) files from a bucket. A real small
    filesystem fills during the download: one error naming the folder, no retries, no part
    file left behind."""
    import os

    from maskdm.pipeline.runstore import Bucket
    from maskdm.shardformat.patience import CacheFull, StoreOptions
    from maskdm.shardformat.remote import CacheOptions, RemoteShards
    from tests.conftest import small_filesystem
    with small_filesystem(tmp_path / "small", "2m") as small:
        blob = os.urandom(4 * 2 ** 20)
        bucket.pipe_file("runs/big/blob.bin", blob)
        shards = RemoteShards("s3://runs/big", CacheOptions(str(small / "cache"),
                                                            patience_s=1800))
        with pytest.raises(CacheFull, match=rf"no space left on the disk of the shard cache "
                                            rf"{small / 'cache'}"):
            shards.fetch("blob.bin", len(blob))
        assert shards.stats["retries"] == 0
        run = Bucket("s3://runs/big", StoreOptions(patience_s=1800), None, "training")
        with pytest.raises(CacheFull, match=rf"no space left on the disk of {small / 'run'} "
                                            rf"while downloading s3://runs/big/blob.bin"):
            run.get(small / "run" / "blob.bin", len(blob), "blob.bin")
        assert run.patience.retries == 0
        assert not list(small.rglob("*.part")) and not list(small.rglob(".*.part"))
        assert not (small / "run" / "blob.bin").exists() and \
            not (small / "cache" / shards.dir.name / "blob.bin").exists()


def test_commands_print_no_credential_inside_a_url(tmp_path, capsys, denying_server):
    """Issue 35, finding 4, outside the trainer: `inspect` and `shard --verify` of a URL with a
    password (here a server that denies everything) print their errors with it as ***."""
    from maskdm.pipeline.cli import main
    url = f"http://alice:hunter2@{denying_server}/ds?token=t0ps3cret"
    for cmd in (["inspect", url], ["shard", "--verify", url, "--quiet"]):
        assert main(cmd) != 0
        out = capsys.readouterr()
        text = out.out + out.err
        assert "denied" in text and "alice:***@" in text, text
        assert "hunter2" not in text and "t0ps3cret" not in text, text
