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
