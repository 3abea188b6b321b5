"""MLflow tracking from rank 0, off the training thread, and never fatal.

Every call is queued and executed by a background thread, so a slow or dead tracking server never
stalls a step. Every metric is first appended to ``RUN_DIR/metrics.jsonl`` (its timestamp is the one
sent to MLflow, so sending a point twice stores it once). When the server cannot be reached, the
tracker says so once and keeps going: metrics wait in a backlog and other calls (params, images,
artifacts, tags, the final status) in a retry list. The first call that reaches the server again
sends the backlog and the retries, and only then says that tracking resumed. What is still
undelivered when the run ends is recorded in ``RUN_DIR/mlflow.json`` (run id, metrics sent, final
status) and sent later by ``maskdm sync RUN_DIR``. A resumed run continues the same MLflow run; a
run started from scratch in a folder whose previous run died marks that run FAILED. Default store
(no ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``): ``sqlite:///RUNS_ROOT/mlflow.db`` with
artifacts in ``RUNS_ROOT/mlartifacts``, no server needed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from maskdm.shardformat.fsutil import redact_url

# Fail fast instead of retrying for minutes against an unreachable server (user settings win).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
# MLflow's own INFO lines ("Creating initial MLflow database tables...") are not the user's
# business during training; its warnings still show.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

# The MLflow 3 UI opens an experiment in its GenAI view unless told otherwise: experiments are
# tagged as model training, and the links we print carry the UI's workflow switch.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_uri(run_dir: str | os.PathLike) -> tuple[str, Path]:
    root = Path(run_dir).resolve().parent
    return f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts"


def runs_url(base: str, experiment_id: str | None, charts: bool = False) -> str:
    """The MLflow UI page listing an experiment's runs (``charts``: their metric charts)."""
    if experiment_id is None:
        return base
    view = "&compareRunsMode=CHART" if charts else ""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"{view}")


def ui_server_command(uri: str) -> str | None:
    """The command that serves the MLflow UI for a local store (None for a tracking server)."""
    if uri.startswith(("http://", "https://")):
        return None
    art = ""
    if uri.startswith("sqlite:///"):
        art = f" --default-artifact-root {Path(uri[len('sqlite:///'):]).parent / 'mlartifacts'}"
    return f"mlflow ui --backend-store-uri {uri}{art} --host 127.0.0.1 --port 5000"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """How to look at an experiment's runs: the page to open (after starting the UI); any
    credentials in ``uri`` shown as ***."""
    uri = redact_url(uri)
    server = ui_server_command(uri)
    if server is None:
        return f"open {runs_url(uri, experiment_id)} in a browser"
    return f"{server}, then open {runs_url('http://127.0.0.1:5000', experiment_id)}"


RECORD = "mlflow.json"
TERMINAL = ("FINISHED", "FAILED", "KILLED")


_REQUEST = re.compile(r"API request to (\S+) failed with exception")
_CAUSE = re.compile(r"(\[Errno -?\d+\][^'\"()]*|Read timed out[^'\"()]*|timed out|"
                    r"Connection (?:refused|reset|aborted)[^'\"()]*)")


def reason(e: Exception, limit: int = 200) -> str:
    """An exception as one short line (its type if it has no message): for a failed MLflow
    request, the address and the network cause ("http://.../runs/log-batch unreachable: [Errno
    111] Connection refused"), never cut in the middle of a word."""
    text = redact_url((str(e).strip().splitlines() or [""])[0])
    if not text:
        return type(e).__name__
    request = _REQUEST.search(text)
    if request:
        cause = _CAUSE.search(text)
        return (f"{request.group(1)} unreachable: "
                f"{cause.group(1).strip() if cause else type(e).__name__}")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def read_record(run_dir: str | os.PathLike) -> dict | None:
    """``RUN_DIR/mlflow.json``: where this run folder's MLflow run is and what reached it."""
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _metrics_of(record: dict, model_id: str | None = None):
    from mlflow.entities import Metric
    ts = int(record["time"] * 1000)
    return [Metric(k, float(v), ts, int(record["step"]), model_id=model_id)
            for k, v in record.items() if k not in ("step", "time")]


def read_jsonl(path: Path, start: int = 0) -> list[dict]:
    """Metric records from line ``start`` on (a torn last line from a crash is ignored)."""
    out = []
    try:
        with open(path) as f:
            for i, line in enumerate(f):
                if i >= start:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return out


def send_metrics(client, run_id: str, records: list[dict], chunk: int = 900) -> None:
    """Send metric records in batches (MLflow takes at most 1000 metrics per call)."""
    metrics = [m for r in records for m in _metrics_of(r)]
    for i in range(0, len(metrics), chunk):
        client.log_batch(run_id, metrics=metrics[i:i + chunk])


class Tracker:
    """No-op on ranks other than 0 and when disabled."""

    def __init__(self, *, enabled: bool, run_dir: str | os.PathLike, experiment: str,
                 run_name: str | None, uri: str | None, run_id: str | None = None,
                 tags: dict[str, str] | None = None, log=print, record: bool | None = None):
        """``record``: append metrics to ``RUN_DIR/metrics.jsonl`` even with MLflow disabled
        (default: only when enabled)."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log = log
        self.failed = False
        self.uri = None
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.model_id: str | None = None  # the MLflow logged model (log_model)
        self._monitor = None  # MLflow's system metrics monitor
        self._latest: dict[str, dict] = {}  # metric name -> the record that logged it last
        self._jsonl = None
        if not enabled:
            if record:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # mlflow may have been imported (and its loggers set up at INFO) before this module
        import logging
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
        jsonl = self.run_dir / "metrics.jsonl"
        self._lines = sum(1 for _ in open(jsonl)) if jsonl.exists() else 0
        previous = read_record(self.run_dir) or {}
        # a previous run of this folder whose process died before its first checkpoint
        self._stale = (previous["run_id"] if run_id is None and previous.get("run_id")
                       and previous.get("status") not in TERMINAL else None)
        self._resumed = run_id is not None
        same = self._resumed and previous.get("run_id") == run_id
        # metrics.jsonl lines already in MLflow; when resuming, the rest is sent first
        self._sent = min(int(previous.get("metrics_sent", self._lines)), self._lines) if same \
            else self._lines
        self._backlog: list[dict] = read_jsonl(jsonl, self._sent)
        self._retry: list = []  # failed calls other than metrics, in order
        self._status, self._status_sent = "RUNNING", False
        self._jsonl = open(jsonl, "a", buffering=1)
        env_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        self._artifacts = None
        if uri or env_uri:
            self.uri = uri or env_uri
        else:
            self.uri, art = default_uri(self.run_dir)
            art.mkdir(parents=True, exist_ok=True)
            self._artifacts = art.as_uri()
        if redact_url(self.uri) != self.uri:
            # MLflow prints run and model links with the URI as given: with credentials in it,
            # only maskdm's own (redacted) link is printed
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            os.environ["MLFLOW_PRINT_MODEL_URLS_ON_CREATION"] = "false"
        self._experiment, self._run_name, self._tags = experiment, run_name, tags or {}
        self._client = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, daemon=True, name="mlflow")
        self._started = threading.Event()
        self._thread.start()
        self._call(self._start)

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, args = item
                # what the outage left undelivered, before this call adds to it
                pending = (sum(len(r) - 2 for r in self._backlog), len(self._retry))
                if fn == self._send_backlog:  # a metric record: it waits in the backlog
                    self._backlog.append(args[0])
                    args = ()
                if not self._attempt(fn, args, pending) and fn != self._send_backlog:
                    self._retry.append((fn, args))
            finally:
                self._queue.task_done()

    def _attempt(self, fn, args, pending: tuple[int, int] = (0, 0)) -> bool:
        """Run one call; True if it reached MLflow. After a success, what is pending is sent,
        and only once that worked is tracking said to have resumed."""
        try:
            try:
                self._ensure_run()
                fn(*args)
            except Exception as e:  # tracking must never stop training
                self._failed_call(e)
                return False
            if self._retry or self._backlog or self.failed:
                try:
                    self._catch_up()
                except Exception as e:
                    self._failed_call(e)
                    return True  # this call went through; the rest waits for the next one
            if self.failed:
                self.failed = False
                self.log(f"MLflow answers again: tracking resumed ({pending[0]} metric value(s) "
                         f"and {pending[1]} other call(s) from the outage sent)")
            return True
        finally:
            self._started.set()

    def _failed_call(self, e: Exception) -> None:
        if not self.failed:
            self.log(f"warning: MLflow call failed ({reason(e)}); training continues, metrics are "
                     f"kept in {self.run_dir / 'metrics.jsonl'} and sent when MLflow answers "
                     f"again", file=sys.stderr)
        self.failed = True

    def _ensure_run(self) -> None:
        """The client and the run exist (created on the first call that reaches the server)."""
        import mlflow
        if self._client is None:
            self._client = mlflow.MlflowClient(self.uri)
        if self.run_id is not None:
            if self.experiment_id is None:
                self.experiment_id = self._client.get_run(self.run_id).info.experiment_id
            return
        if self._stale is not None:
            try:
                if self._client.get_run(self._stale).info.status == "RUNNING":
                    self._client.set_tag(self._stale, "maskdm.ended", "its training process died "
                                         "before the first checkpoint; restarted as a new run")
                    self._client.set_terminated(self._stale, status="FAILED")
            except mlflow.exceptions.MlflowException:
                pass  # deleted, or kept on another server: nothing to correct
            self._stale = None
        exp = self._client.get_experiment_by_name(self._experiment)
        if exp is None:
            exp_id = self._client.create_experiment(self._experiment,
                                                    artifact_location=self._artifacts,
                                                    tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():
                if k not in exp.tags:  # made by an older maskdm or by hand
                    self._client.set_experiment_tag(exp_id, k, v)
        self.experiment_id = exp_id
        self.run_id = self._client.create_run(exp_id, run_name=self._run_name,
                                              tags=self._tags).info.run_id
        self._write_record()

    def _start(self) -> None:
        if self._resumed:  # the same run goes on
            self._client.update_run(self.run_id, status="RUNNING")
        self._write_record()

    def _send_backlog(self) -> None:
        if self._backlog:
            send_metrics(self._client, self.run_id, self._backlog)
            self._sent += len(self._backlog)
            self._backlog = []
            self._write_record()

    def _catch_up(self) -> None:
        """The server answered: send the metrics backlog and the failed calls, in order."""
        self._send_backlog()
        while self._retry:
            fn, args = self._retry[0]
            fn(*args)
            self._retry.pop(0)

    def _write_record(self) -> None:
        if self.run_id is None:
            return
        from maskdm.shardformat.fsutil import atomic_write_json
        atomic_write_json(self.run_dir / RECORD, {
            "uri": redact_url(self.uri), "run_id": self.run_id, "experiment": self._experiment,
            "experiment_id": self.experiment_id,
            "metrics_sent": self._sent, "status": self._status, "status_sent": self._status_sent})

    def _call(self, fn, *args) -> None:
        if self.enabled:
            self._queue.put((fn, args))

    def wait_started(self, timeout: float = 60.0) -> str | None:
        """The MLflow run id, once the first call returned (None if tracking is off, or the
        server could not be reached yet: the run is then created when it can be)."""
        if not self.enabled:
            return None
        self._started.wait(timeout)
        return self.run_id

    # ------------------------------------------------------------------ public API
    def log_params(self, params: dict[str, Any]) -> None:
        def do(items):  # (mlflow imported only when tracking is on: a GPU box may lack it)
            from mlflow.entities import Param
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        items = [(k[:250], str(v)[:6000]) for k, v in params.items()]
        self._call(do, items)

    def log_metrics(self, metrics: dict[str, float], step: int,
                    timestamp: float | None = None) -> None:
        """``timestamp``: when the values were taken (default: now), in seconds."""
        if self._jsonl is None:
            return
        record = {"step": step, "time": timestamp or time.time(),
                  **{k: float(v) for k, v in metrics.items()}}
        self._latest.update({k: record for k in metrics})
        self._jsonl.write(json.dumps(record) + "\n")
        if not self.enabled:
            return
        self._lines += 1
        self._call(self._send_backlog, record)

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

    def start_system_metrics(self, interval: float) -> None:
        """CPU, memory, disk, network and (with pynvml) GPU utilisation, sampled by MLflow's own
        monitor every ``interval`` seconds into the run's "System metrics" (``system/...``)."""
        def do():
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            except ImportError as e:  # psutil missing: say so once, train on
                self.log(f"note: no system metrics ({reason(e)}); `pip install psutil` (and "
                         f"nvidia-ml-py for GPUs) to get them", file=sys.stderr)
                return
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                 resume_logging=self._resumed,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        self._call(do)

    def log_model(self, local_dir: str | os.PathLike, *, name: str, params: dict[str, Any],
                  metrics: list[str], step: int = 0, register_as: str | None = None) -> None:
        """An MLflow 3 logged model (the "Models" tab) holding ``local_dir`` (safetensors + JSON,
        no pickled code), with its parameters and the latest value of each of ``metrics`` linked
        to it (the same points as in the run's curves, not new ones); with ``register_as``, also a
        new version of that registered model."""
        latest = [{"step": r["step"], "time": r["time"], k: r[k]}
                  for k in metrics if (r := self._latest.get(k)) is not None]

        def do():  # retried after an outage: the model is created once, the rest is idempotent
            if self.model_id is None:
                self.model_id = self._client.create_logged_model(
                    self.experiment_id, name=name, source_run_id=self.run_id,
                    params={k[:250]: str(v)[:6000] for k, v in params.items()},
                    model_type="maskdm-uvit", tags={"maskdm.format": "safetensors"}).model_id
            self._client.log_model_artifacts(self.model_id, str(local_dir))
            from mlflow.entities import LoggedModelOutput
            # an output of the run: its page lists it under "Logged models"
            self._client.log_outputs(self.run_id, [LoggedModelOutput(self.model_id, step)])
            linked = [m for r in latest for m in _metrics_of(r, self.model_id)]
            if linked:
                self._client.log_batch(self.run_id, metrics=linked)
            self._client.finalize_logged_model(self.model_id, "READY")
            if register_as:
                from mlflow.exceptions import MlflowException
                try:
                    self._client.create_registered_model(register_as)
                except MlflowException as e:
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                version = self._client.create_model_version(
                    register_as, f"models:/{self.model_id}", run_id=self.run_id,
                    model_id=self.model_id)
                self.log(f"registered model {register_as!r} version {version.version}")
        self._call(do)

    def set_tags(self, tags: dict[str, str]) -> None:
        def do():
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)
        self._call(do)

    def finish(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        """Deliver what is queued (bounded wait) and end the run with ``status``; True if
        everything reached MLflow. Otherwise says, truthfully, what did not and how to send it."""
        if not self.enabled or self._status in TERMINAL:  # disabled, or already finished
            if not self.enabled and self._jsonl:
                self._jsonl.close()
                self._jsonl = None
            return not self.enabled or not self.failed
        self._status = status

        def terminate():
            if self._monitor is not None:  # its last samples first, while the run still runs
                monitor, self._monitor = self._monitor, None
                monitor.finish()
                # and one closing sample: a run shorter than the sampling interval (or one whose
                # monitor thread had not yet reached its first publish) still shows its machine
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            self._client.set_terminated(self.run_id, status=status)
            self._status_sent = True
        self._call(terminate)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._jsonl:
            self._jsonl.close()
        stuck = self._thread.is_alive()
        try:
            self._write_record()
        except OSError:
            pass
        if not stuck and self._status_sent and not self._backlog and not self._retry:
            return True
        why = f"did not answer within {timeout:.0f}s" if stuck else "could not be reached"
        if self.run_id is None:
            self.log(f"warning: MLflow {why} during the whole run, so no MLflow run exists for it; "
                     f"the metrics are in {self.run_dir / 'metrics.jsonl'}", file=sys.stderr)
            return False
        left = [f"{self._lines - self._sent} metric record(s)"] if self._lines > self._sent else []
        if not self._status_sent:
            left.append(f"the final status {status}")
        others = len(self._retry) - (0 if self._status_sent else 1)
        lost = (f"; {others} other call(s) (params, images or artifacts; their files are in "
                f"{self.run_dir}) are not re-sent" if others > 0 and not stuck else "")
        self.log(f"warning: MLflow {why} at the end of the run; not delivered: "
                 f"{', '.join(left) or 'the calls still queued'}. Send them with `maskdm sync "
                 f"{self.run_dir}` once MLflow is back{lost}", file=sys.stderr)
        return False


CREDENTIAL_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def sync(run_dir: str | os.PathLike, uri: str | None = None, log=print) -> int:
    """``maskdm sync RUN_DIR``: send what a run could not deliver to MLflow (metrics from
    ``metrics.jsonl`` after the last delivered line, and its final status). Safe to repeat: a
    metric point sent twice is stored once. The server: ``uri``, else ``MLFLOW_TRACKING_URI``,
    else the one the folder's record names, but that one only without MLflow credentials in the
    environment (a folder written by someone else must not collect them)."""
    import mlflow
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrackingError(f"{run_dir} does not exist (give the run folder, train.run_dir)")
    record = read_record(run_dir)
    if record is None or not record.get("run_id"):
        raise TrackingError(f"{run_dir} has no {RECORD}: it was not tracked with MLflow, or the "
                            f"server was never reachable during the run (its metrics are in "
                            f"{run_dir / 'metrics.jsonl'})")
    target = uri or os.environ.get("MLFLOW_TRACKING_URI") or record.get("uri")
    held = [v for v in CREDENTIAL_VARS if os.environ.get(v)]
    if not (uri or os.environ.get("MLFLOW_TRACKING_URI")) and held and \
            str(target).startswith(("http://", "https://")):
        # the folder may be someone else's: its server gets no credentials without being named
        raise TrackingError(f"{run_dir / RECORD} names the server {target!r}, and your MLflow "
                            f"credentials ({', '.join(held)}) go only to a server you name: pass "
                            f"--uri {target} (or set MLFLOW_TRACKING_URI) if it is yours")
    client = mlflow.MlflowClient(target)
    run_id = record["run_id"]
    try:
        status = client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # unreachable: the caller says so
        raise TrackingError(f"run {run_id} is not on {target}; pass --uri if the "
                            f"server moved") from None
    records = read_jsonl(run_dir / "metrics.jsonl", int(record.get("metrics_sent", 0)))
    send_metrics(client, run_id, records)
    record["metrics_sent"] = int(record.get("metrics_sent", 0)) + len(records)
    final = record.get("status")
    set_status = final in TERMINAL and status != final
    if set_status:
        client.set_terminated(run_id, status=final)
        record["status_sent"] = True
    from maskdm.shardformat.fsutil import atomic_write_json
    atomic_write_json(run_dir / RECORD, record)
    log(f"run {run_id}: sent {len(records)} metric record(s)"
        + (f"; status {status} -> {final}" if set_status else f"; status {status}"))
    if final not in TERMINAL:
        log(f"note: {run_dir} has no final status (still running, or its process died: resume it "
            f"with `maskdm train --resume auto` to continue the same MLflow run)")
    return 0


class TrackingError(RuntimeError):
    pass
