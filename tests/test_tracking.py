"""MLflow against a real ``mlflow server`` on 127.0.0.1 started here; training survives its death."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, shard_set
from tests.test_train import _env, train_cmd

pytestmark = pytest.mark.skipif(shutil.which("mlflow") is None and
                                not (Path(sys.executable).parent / "mlflow").exists(),
                                reason="mlflow is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path):
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy: {(root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("track"), "s", count=64, samples_per_shard=32)


def _env_with(uri: str) -> dict:
    env = _env()
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def test_params_metrics_images_and_lineage_on_a_real_server(shards, tmp_path):
    server = Server(tmp_path)
    try:
        cmd = train_cmd(shards, tmp_path / "pre", "tracking.enabled=true", "train.sample_every=3",
                        "tracking.experiment=test")
        r = subprocess.run(cmd, cwd=ROOT, env=_env_with(server.uri), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        cmd = train_cmd(shards, tmp_path / "ft", "tracking.enabled=true", "tracking.experiment=test",
                        "train.stage=finetune", "mask.kind=none", "train.steps=2",
                        f"train.init_from={tmp_path / 'pre'}")
        r2 = subprocess.run(cmd, cwd=ROOT, env=_env_with(server.uri), capture_output=True,
                            text=True, timeout=600)
        assert r2.returncode == 0, r2.stderr[-3000:]

        from mlflow import MlflowClient
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("test")
        runs = {r.data.tags["maskdm.stage"]: r for r in client.search_runs([exp.experiment_id])}
        pre, ft = runs["pretrain"], runs["finetune"]
        assert pre.info.status == "FINISHED"
        assert pre.data.params["train.steps"] == "6" and pre.data.params["world_size"] == "1"
        assert pre.data.params["mask.kind"] == "block" and "ds.zero_optimization" in pre.data.params
        history = client.get_metric_history(pre.info.run_id, "loss")
        assert [m.step for m in history] == [2, 4, 6]
        assert {"lr", "grad_norm", "img_per_s", "data_wait_frac", "skipped_samples"} <= set(pre.data.metrics)
        arts = {a.path for a in client.list_artifacts(pre.info.run_id, "samples")}
        assert {"samples/step_00000003.png", "samples/step_00000006.png"} <= arts
        model = {a.path for a in client.list_artifacts(pre.info.run_id, "model")}
        assert "model/model.safetensors" in model
        assert ft.data.tags["maskdm.parent_run_id"] == pre.info.run_id
    finally:
        server.stop()


def test_training_finishes_when_the_server_dies(shards, tmp_path):
    server = Server(tmp_path)
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, "tracking.enabled=true", "train.steps=60",
                    "train.log_every=2", "train.ckpt_every=30")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env_with(server.uri), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        jsonl = run_dir / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        server.stop()  # the tracking server dies mid-run
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, err[-3000:]
    assert "MLflow call failed" in err and "training continues" in err
    assert "done: 60 steps" in out
    assert len(jsonl.read_text().splitlines()) == 30  # every metric kept locally
