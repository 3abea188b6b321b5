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
