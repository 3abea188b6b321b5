"""MLflow against a real ``mlflow server`` on 127.0.0.1 started here; training survives its death."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, shard_set
from tests.test_train import _env, train_cmd
from tests.ui_check import MlflowServer

pytestmark = pytest.mark.skipif(shutil.which("mlflow") is None and
                                not (Path(sys.executable).parent / "mlflow").exists(),
                                reason="mlflow is not installed")


def Server(root: Path, port: int | None = None) -> MlflowServer:
    """A real ``mlflow server`` over ``root``'s store, serving artifacts itself (as a shared
    tracking server does); ``port``: the same address again after a stop."""
    return MlflowServer(root / "mlflow.db", ["--artifacts-destination", str(root / "artifacts")],
                        root / "server.log", port=port, timeout=90)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("track"), "s", count=64, samples_per_shard=32)


def _env_with(uri: str) -> dict:
    env = _env()
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def _start_training(shards, run_dir: Path, server: Server, *sets: str) -> subprocess.Popen:
    """A tracked training run in the background, logging to ``server``."""
    return subprocess.Popen(train_cmd(shards, run_dir, "tracking.enabled=true", *sets), cwd=ROOT,
                            env=_env_with(server.uri), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_params_metrics_images_and_lineage_on_a_real_server(shards, tmp_path):
    server = Server(tmp_path)
    try:
        cmd = train_cmd(shards, tmp_path / "pre", "tracking.enabled=true", "train.sample_every=3",
                        "tracking.experiment=test", "tracking.system_metrics_every=3600",
                        "tracking.register_model=maskdm-test")
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
        # the MLflow 3 UI opens this experiment as model training, not GenAI
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        # curves get a point per step (tracking.points > steps); rates come with console lines
        for key in ("loss", "lr", "grad_norm", "train_flops"):
            assert [m.step for m in client.get_metric_history(pre.info.run_id, key)] == \
                [1, 2, 3, 4, 5, 6], key
        for key in ("img_per_s", "data_wait_frac", "skipped_samples"):
            assert [m.step for m in client.get_metric_history(pre.info.run_id, key)] == [2, 4, 6]
        # a run far shorter than the sampling interval still gets its closing system sample
        assert any(k.startswith("system/cpu_utilization") for k in pre.data.metrics), \
            sorted(pre.data.metrics)
        arts = {a.path for a in client.list_artifacts(pre.info.run_id, "samples")}
        assert {"samples/step_00000003.png", "samples/step_00000006.png"} <= arts
        # the export is an MLflow logged model with its parameters, linked metrics and files
        models = client.search_logged_models([exp.experiment_id])
        by_run = {m.source_run_id: m for m in models}
        model = by_run[pre.info.run_id]
        assert model.name == "maskdm-pretrain" and str(model.status).endswith("READY")
        assert model.params["model.preset"] == "tiny" and model.params["train.stage"] == "pretrain"
        assert {m.key for m in model.metrics} >= {"loss", "train_flops"}
        files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
        assert {"model.safetensors", "config.json"} <= files
        version = client.get_model_version("maskdm-test", "1")
        assert version.run_id == pre.info.run_id and version.source == f"models:/{model.model_id}"
        assert ft.data.tags["maskdm.parent_run_id"] == pre.info.run_id
        assert "maskdm-finetune" == by_run[ft.info.run_id].name
        assert "workflowType=machine_learning" in r.stdout  # where to click
    finally:
        server.stop()


@pytest.mark.slow
def test_training_finishes_when_the_server_dies(shards, tmp_path):
    server = Server(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start_training(shards, run_dir, server, "train.steps=60",
                           "train.log_every=2", "train.ckpt_every=30")
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
    assert len(jsonl.read_text().splitlines()) == 60  # every point (one per step) kept locally


def _wait_lines(path: Path, n: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


def _loss_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
def test_an_outage_mid_run_is_caught_up_when_the_server_returns(shards, tmp_path):
    """The server dies mid-run and comes back: the metrics logged meanwhile are sent, the run
    ends FINISHED, and "tracking resumed" is printed only once it is true."""
    server = Server(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start_training(shards, run_dir, server, "train.steps=300", "train.log_every=2",
                           "train.ckpt_every=300", "tracking.experiment=outage")
    try:
        jsonl = run_dir / "metrics.jsonl"
        _wait_lines(jsonl, 3, proc)
        server.stop()
        _wait_lines(jsonl, 8, proc)  # a few metrics are logged while it is down
        down = len(jsonl.read_text().splitlines())
        server = Server(tmp_path, port=server.port)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, err[-3000:]
    assert down < 300, "the run ended before the server came back; make it longer"
    assert err.count("MLflow call failed") == 1
    assert out.count("MLflow answers again: tracking resumed") == 1
    import re
    caught_up = int(re.search(r"tracking resumed \((\d+) metric value", out).group(1))
    assert caught_up >= 5 * 3, out  # at least the 5 records logged while it was down
    assert "not delivered" not in err
    server = Server(tmp_path, port=server.port)
    try:
        from mlflow import MlflowClient
        client = MlflowClient(server.uri)
        run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert _loss_steps(client, run_id) == list(range(1, 301))
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_down_at_the_end_is_synced_later(shards, tmp_path):
    """The server is down when training ends: the run says exactly what was not delivered, and
    `maskdm sync` sends it (metrics and the FINISHED status) once the server is back."""
    server = Server(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start_training(shards, run_dir, server, "train.steps=30",
                           "train.log_every=2", "train.ckpt_every=30", "tracking.experiment=late")
    try:
        _wait_lines(run_dir / "metrics.jsonl", 2, proc)
        server.stop()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, err[-3000:]
    assert "not delivered:" in err and "the final status FINISHED" in err
    assert f"maskdm sync {run_dir}" in err
    assert "tracking resumed" not in out + err
    sync = [sys.executable, "-m", "maskdm", "sync", str(run_dir)]
    down = subprocess.run(sync, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert down.returncode == 1 and "could not be reached" in down.stderr
    assert "Traceback" not in down.stderr
    server = Server(tmp_path, port=server.port)
    try:
        r = subprocess.run(sync, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "status RUNNING -> FINISHED" in r.stdout
        from mlflow import MlflowClient
        client = MlflowClient(server.uri)
        run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert _loss_steps(client, run_id) == list(range(1, 31))
        again = subprocess.run(sync, cwd=ROOT, env=_env(), capture_output=True, text=True,
                               timeout=300)
        assert "sent 0 metric record(s); status FINISHED" in again.stdout
        assert _loss_steps(client, run_id) == list(range(1, 31))
    finally:
        server.stop()


@pytest.mark.slow
def test_runs_killed_and_restarted_end_with_a_true_status(shards, tmp_path):
    """kill -9 after a checkpoint + `--resume auto`: the same MLflow run goes on and ends FINISHED.
    kill -9 before any checkpoint + a restart: that run is marked FAILED, a new one FINISHED."""
    from mlflow import MlflowClient
    server = Server(tmp_path)
    try:
        client = MlflowClient(server.uri)
        env = _env_with(server.uri)
        for case, ckpt_every in (("resumed", 10), ("restarted", 1000)):
            run_dir = tmp_path / case
            sets = ("tracking.enabled=true", "train.steps=40", "train.log_every=2",
                    f"train.ckpt_every={ckpt_every}", f"tracking.experiment={case}")
            proc = subprocess.Popen(train_cmd(shards, run_dir, *sets), cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            target = run_dir / "checkpoints" / "step_00000010"
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if (case == "resumed" and target.exists()) or (
                        case == "restarted" and (run_dir / "metrics.jsonl").exists()
                        and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "training ended before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            first = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
            assert client.get_run(first).info.status == "RUNNING"
            r = subprocess.run(train_cmd(shards, run_dir, *sets, resume="auto"), cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            second = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
            assert client.get_run(second).info.status == "FINISHED"
            if case == "resumed":
                assert second == first
                assert set(_loss_steps(client, first)) == set(range(1, 41))
            else:
                assert second != first
                old = client.get_run(first)
                assert old.info.status == "FAILED" and "died" in old.data.tags["maskdm.ended"]
    finally:
        server.stop()


def test_an_unreachable_server_is_named_in_one_whole_line():
    """The outage warning names the request's address whole and the network cause (it used to be
    cut off mid-URL): a real MLflow client against a port nobody listens on."""
    import socket

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from maskdm.pipeline.tracking import reason
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(Exception) as caught:
        MlflowClient(f"http://127.0.0.1:{port}").log_batch("0" * 32, [Metric("a", 1.0, 0, 0)])
    line = reason(caught.value)
    assert line.startswith(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/log-batch unreachable: ")
    assert line.endswith("Connection refused") and "\n" not in line, line


@pytest.mark.slow
def test_a_finished_run_run_again_changes_nothing(shards, tmp_path):
    """`--resume auto` on a finished run (what re-running `maskdm demo` does) returns at once:
    no engine, no new logged model, the MLflow run not reopened and its times unchanged. The
    run's page lists its logged model (a run output); the export follows the umask."""
    import os

    from mlflow import MlflowClient

    from tests.test_train import run_train
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ("tracking.enabled=true", f"tracking.uri={uri}")
    first = run_train(shards, tmp_path / "run", *sets)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("maskdm")
    (run,) = client.search_runs([exp.experiment_id])
    models = client.search_logged_models([exp.experiment_id])
    assert len(models) == 1 and run.info.status == "FINISHED"
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    umask = os.umask(0)
    os.umask(umask)
    export = tmp_path / "run" / "export"
    assert {f.name: f.stat().st_mode & 0o777 for f in export.iterdir()} == \
        {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}
    again = run_train(shards, tmp_path / "run", *sets, resume="auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished: step 6 of 6" in again.stdout and "nothing to do" in again.stdout
    (after,) = client.search_runs([exp.experiment_id])
    assert len(client.search_logged_models([exp.experiment_id])) == 1
    assert (after.info.status, after.info.start_time, after.info.end_time) == \
        (run.info.status, run.info.start_time, run.info.end_time)
