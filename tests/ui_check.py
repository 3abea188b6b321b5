"""What a user sees in the MLflow UI, checked in a real headless Chromium.

    python -m tests.ui_check [--runs demo_output/runs] [--out docs/img]

Starts ``mlflow server`` on 127.0.0.1 over a runs folder's store (``RUNS/mlflow.db`` +
``RUNS/mlartifacts``, as ``maskdm demo`` leaves them; without ``--runs`` it makes one: a short
pre-training and fine-tune of the test model on procedural faces), opens the links maskdm prints
and checks that:

- the runs page is the model-training view (not the GenAI overview) and lists the pre-training
  run, with the fine-tune nested under it (the screenshot is taken first, as a new user sees the
  page; the checks then expand it);
- the charts page renders the loss chart (a plotted curve, not an empty frame);
- the fine-tune run's own page lists the model it logged;
- the Models tab lists the exported models.

Screenshots of each page go to ``--out`` (runs.png, charts.png, run.png, models.png). Needs Chromium,
ChromeDriver (Debian: ``apt-get install chromium chromium-driver``) and ``pip install selenium``.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = "chromedriver"


def browser_available() -> str | None:
    """None if the check can run here, else what is missing."""
    if not any(shutil.which(c) for c in CHROMIUM):
        return "no Chromium (apt-get install chromium)"
    if not shutil.which(CHROMEDRIVER):
        return "no ChromeDriver (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "no selenium (pip install selenium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _maskdm(*args: str, cwd: Path) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI="")
    env.pop("MLFLOW_TRACKING_URI")
    r = subprocess.run([sys.executable, "-m", "maskdm", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"maskdm {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def make_runs(work: Path) -> Path:
    """A short tracked pre-training + fine-tune (the demo's experiment name and layout)."""
    _maskdm("shard", "procedural", str(work / "shards"), "--size", "32", "--count", "64",
            "--quiet", cwd=ROOT)
    runs = work / "runs"
    common = ["--config", str(ROOT / "configs/test_tiny.yaml"), "--set",
              f"data.shards={work / 'shards'}", "--set", "tracking.enabled=true", "--set",
              "tracking.experiment=maskdm-demo", "--set", "train.log_every=5", "--set",
              "tracking.system_metrics_every=1"]
    _maskdm("train", *common, "--set", f"train.run_dir={runs / 'pretrain'}", "--set",
            "train.steps=40", "--set", "tracking.run_name=pretrain (MSM)", cwd=ROOT)
    _maskdm("train", *common, "--set", f"train.run_dir={runs / 'finetune'}", "--set",
            "train.steps=20", "--set", "train.stage=finetune", "--set", "mask.kind=none",
            "--set", f"train.init_from={runs / 'pretrain'}", "--set",
            "tracking.run_name=finetune (DSM)", cwd=ROOT)
    return runs


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over the SQLite store ``db``, started for real (the tests
    use it too); ``artifacts``: the server's artifact options; ``port``: reuse a port (a
    restarted server)."""

    def __init__(self, db: Path, artifacts: list[str], log: Path, port: int | None = None,
                 timeout: float = 120.0):
        self.port = port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.log_path, self._log = log, open(log, "a")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{db}", *artifacts],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
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
        raise RuntimeError(f"mlflow server did not become healthy: "
                           f"{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()


def _driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(c) for c in CHROMIUM if shutil.which(c))
    # no sandbox (root in containers); no background traffic (these machines have no network)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER)), options=options)


def _wait(what: str, test, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = test()
        except Exception:  # the page is still rendering (stale or missing elements)
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _close_assistant(driver) -> None:
    """MLflow 3.x opens an assistant side panel; close it so the screenshots show the runs."""
    from selenium.webdriver.common.by import By
    for b in driver.find_elements(By.CSS_SELECTOR, "button[aria-label]"):
        label = (b.get_attribute("aria-label") or "").lower()
        if "close" in label and b.is_displayed() and b.location["x"] > 900:
            b.click()
            time.sleep(0.5)
            return


def check(runs: Path, out: Path, width: int = 1600, height: int = 1000) -> list[str]:
    """Run every check against ``runs``; screenshots in ``out``. -> the failures (empty: all
    passed)."""
    from selenium.webdriver.common.by import By

    from maskdm.pipeline.tracking import read_record, runs_url
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(runs / "finetune") or read_record(runs / "pretrain") or {}
    experiment_id = record.get("experiment_id")
    if experiment_id is None:
        return [f"{runs}/finetune/mlflow.json names no experiment id: not a tracked run folder"]
    server = MlflowServer(runs / "mlflow.db",
                          ["--default-artifact-root", str(runs / "mlartifacts")],
                          Path(tempfile.mkdtemp(prefix="maskdm-ui-")) / "server.log")
    driver = _driver(width, height)
    failures = []
    try:
        runs_page = runs_url(server.uri, experiment_id)
        driver.get(runs_page)
        try:
            body = _wait("the runs table", lambda: (t := driver.find_element(
                By.TAG_NAME, "body").text) and "pretrain" in t and t)
            if "Traces" in body.split("\n")[:40] and "Overview" in body.split("\n")[:40]:
                failures.append("runs page: the GenAI navigation (Overview/Traces) is shown")
            time.sleep(1.0)
            driver.save_screenshot(str(out / "runs.png"))  # as a new user first sees it
            _close_assistant(driver)
            # a parent run's name cell starts with a (+) button that shows its child runs
            expanders = driver.find_elements(By.CSS_SELECTOR,
                                             '[role=gridcell][col-id*="Run Name"] button')
            if "finetune" not in body:
                if not expanders:
                    failures.append("runs page: the fine-tune run is neither listed nor behind "
                                    "an expander")
                else:
                    expanders[0].click()
                    _wait("the nested fine-tune run", lambda: "finetune" in driver.find_element(
                        By.TAG_NAME, "body").text)
        except AssertionError as e:
            failures.append(f"runs page: {e}")
            driver.save_screenshot(str(out / "runs.png"))

        driver.get(runs_url(server.uri, experiment_id, charts=True))
        try:
            _wait("the charts", lambda: len(driver.find_elements(By.CSS_SELECTOR,
                                                                 ".js-plotly-plot")) >= 3)

            def loss_curve():
                for card in driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"):
                    box = card.find_element(By.XPATH, "./ancestor::*[.//*[normalize-space(text())"
                                            "='loss']][1]")
                    if box and card.find_elements(By.CSS_SELECTOR, "path.js-line"):
                        return card
                return None
            _wait("a drawn loss curve", loss_curve)
        except AssertionError as e:
            failures.append(f"charts page: {e}")
        time.sleep(1.0)
        driver.save_screenshot(str(out / "charts.png"))

        run_id = record.get("run_id")
        driver.get(f"{server.uri}/#/experiments/{experiment_id}/runs/{run_id}")
        try:  # the run's own page lists the model it logged (a run output)
            _wait("the run page's logged model", lambda: "maskdm-finetune" in driver.find_element(
                By.TAG_NAME, "body").text)
        except AssertionError as e:
            failures.append(f"run page: {e}")
        driver.save_screenshot(str(out / "run.png"))

        driver.get(f"{server.uri}/#/experiments/{experiment_id}/models"
                   f"?workflowType=machine_learning")
        try:
            _wait("the logged models", lambda: "maskdm-finetune" in driver.find_element(
                By.TAG_NAME, "body").text)
        except AssertionError as e:
            failures.append(f"models page: {e}")
        _close_assistant(driver)
        driver.save_screenshot(str(out / "models.png"))
    finally:
        driver.quit()
        server.stop()
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.ui_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=None,
                   help="a runs folder with mlflow.db and mlartifacts (e.g. demo_output/runs); "
                   "default: make a short one in a temporary folder")
    p.add_argument("--out", type=Path, default=Path("ui_check"),
                   help="folder for the screenshots (default ./ui_check)")
    args = p.parse_args(argv)
    missing = browser_available()
    if missing:
        print(f"error: cannot check the UI here: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs.resolve() if args.runs else make_runs(Path(tmp))
        failures = check(runs, args.out.resolve())
    for f in failures:
        print(f"FAIL {f}")
    print(json.dumps({"passed": not failures, "screenshots": str(args.out.resolve())}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
