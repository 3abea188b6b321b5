"""MLflow tracking from rank 0, off the training thread, and never fatal.

Every call is queued and executed by a background thread, so a slow or dead tracking server never
stalls a step. If a call fails, the tracker says so once, keeps going (later calls are tried
again: a server that comes back gets the rest), and every metric is also appended to
``RUN_DIR/metrics.jsonl``. Default store (no ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``):
``sqlite:///RUNS_ROOT/mlflow.db`` with artifacts in ``RUNS_ROOT/mlartifacts``, no server needed.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Fail fast instead of retrying for minutes against an unreachable server (user settings win).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def default_uri(run_dir: str | os.PathLike) -> tuple[str, Path]:
    root = Path(run_dir).resolve().parent
    return f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    art = ""
    if uri.startswith("sqlite:///"):
        art = f" --default-artifact-root {Path(uri[len('sqlite:///'):]).parent / 'mlartifacts'}"
    return f"mlflow ui --backend-store-uri {uri}{art} --host 127.0.0.1 --port 5000"


class Tracker:
    """No-op on ranks other than 0 and when disabled."""

    def __init__(self, *, enabled: bool, run_dir: str | os.PathLike, experiment: str,
                 run_name: str | None, uri: str | None, run_id: str | None = None,
                 tags: dict[str, str] | None = None, log=print):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log = log
        self.run_id = run_id
        self.failed = False
        self.uri = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        env_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        artifacts = None
        if uri or env_uri:
            self.uri = uri or env_uri
        else:
            self.uri, art = default_uri(self.run_dir)
            art.mkdir(parents=True, exist_ok=True)
            artifacts = art.as_uri()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, daemon=True, name="mlflow")
        self._started = threading.Event()
        self._thread.start()
        self._call(self._start, experiment, run_name, artifacts, tags or {})

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            fn, args = item
            try:
                fn(*args)
                if self.failed:
                    self.log("MLflow is reachable again; tracking resumed")
                    self.failed = False
            except Exception as e:  # tracking must never stop training
                if not self.failed:
                    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    self.log(f"warning: MLflow call failed ({first}); training continues, metrics "
                             f"are kept in {self.run_dir / 'metrics.jsonl'}", file=sys.stderr)
                self.failed = True
            finally:
                self._queue.task_done()

    def _call(self, fn, *args) -> None:
        if self.enabled:
            self._queue.put((fn, args))

    def _start(self, experiment, run_name, artifacts, tags) -> None:
        try:
            import mlflow
            self._client = mlflow.MlflowClient(self.uri)
            if self.run_id is not None:  # resumed: keep logging into the same run
                self._client.update_run(self.run_id, status="RUNNING")
                return
            exp = self._client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(
                experiment, artifact_location=artifacts)
            run = self._client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        finally:
            self._started.set()

    def wait_started(self, timeout: float = 60.0) -> str | None:
        """The MLflow run id, once the run exists (None if tracking is off or failed)."""
        if not self.enabled:
            return None
        self._started.wait(timeout)
        return self.run_id

    # ------------------------------------------------------------------ public API
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        def do(items):
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        items = [(k[:250], str(v)[:6000]) for k, v in params.items()]
        self._call(do, items)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)

        def do(ms):
            self._client.log_batch(self.run_id, metrics=ms)
        self._call(do, [Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_image(self, image, artifact_file: str) -> None:
        self._call(lambda: self._client.log_image(self.run_id, image, artifact_file=artifact_file))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under ``artifact_path``."""
        if Path(path).is_dir():
            self._call(lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(lambda: self._client.log_text(self.run_id, text, artifact_file))

    def set_tags(self, tags: dict[str, str]) -> None:
        def do():
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)
        self._call(do)

    def finish(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        """Flush the queue (bounded wait) and close the run; True if everything was delivered."""
        if not self.enabled:
            return True
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))
        self._queue.put(None)
        self._thread.join(timeout)
        if self._jsonl:
            self._jsonl.close()
        if self._thread.is_alive():
            self.log(f"warning: MLflow did not answer within {timeout:.0f}s; the rest of the "
                     f"tracking data is only in {self.run_dir / 'metrics.jsonl'}", file=sys.stderr)
            return False
        return not self.failed
