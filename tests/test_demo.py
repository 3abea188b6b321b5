"""The README's main command, as a user runs it: `maskdm demo --quick` end to end (subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from PIL import Image

from tests.test_train import _env


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "maskdm", "demo", "--quick", "--out", str(out)],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("1/4 shard", "2/4 pre-train", "3/4 fine-tune", "4/4 sample"):
        assert stage in r.stdout
    assert "$ maskdm train --config configs/demo_pretrain.yaml" in r.stdout
    assert "mlflow ui --backend-store-uri" in r.stdout
    # where to click: the runs page in the UI's model-training view, and its charts
    assert "#/experiments/1/runs?workflowType=machine_learning\n" in r.stdout
    assert "workflowType=machine_learning&compareRunsMode=CHART" in r.stdout
    assert "INFO mlflow" not in r.stdout + r.stderr  # MLflow's own chatter stays out
    assert len(list((out / "samples").glob("*.png"))) == 64
    assert Image.open(out / "samples.png").size[0] > 200
    assert (out / "runs" / "finetune" / "export" / "model.safetensors").exists()
    # the samples are scored against held-out faces, next to real faces scored the same way
    import re
    m = re.search(r"SWD x1e3 to 64 held-out faces .*: samples ([\d.]+) on 7x7 patches, ([\d.]+) "
                  r"on whole images; 64 real training faces score ([\d.]+) and ([\d.]+)", r.stdout)
    assert m, r.stdout[-2000:]
    assert all(float(v) > 0 for v in m.groups())
    # both runs in one MLflow experiment, the fine-tune linked to its parent
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maskdm-demo")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["maskdm.stage"] for r in runs) == ["finetune", "pretrain"]
    ft = next(r for r in runs if r.data.tags["maskdm.stage"] == "finetune")
    pre = next(r for r in runs if r.data.tags["maskdm.stage"] == "pretrain")
    assert ft.data.tags["maskdm.parent_run_id"] == pre.info.run_id
    assert client.get_metric_history(pre.info.run_id, "loss")

    # a second run resumes: nothing is retrained
    r2 = subprocess.run([sys.executable, "-m", "maskdm", "demo", "--quick", "--out", str(out)],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "(0 written now, 64 already there)" in r2.stdout

    # a demo folder from an older maskdm (its checkpoints lack diffusion.loss_weight: the uniform
    # loss): the re-run refuses to resume it with min-SNR, says why and how to start over
    import json
    for meta in (out / "runs" / "pretrain" / "checkpoints").glob("*/meta.json"):
        d = json.loads(meta.read_text())
        del d["config"]["diffusion"]["loss_weight"]
        meta.write_text(json.dumps(d))
    r3 = subprocess.run([sys.executable, "-m", "maskdm", "demo", "--quick", "--out", str(out)],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r3.returncode == 1
    assert "cannot resume with a different diffusion.loss_weight: 'uniform' -> 'min_snr'" in \
        r3.stdout
    assert "`maskdm demo --fresh` starts over" in r3.stderr


def test_relay_keeps_bars_out_of_the_log_and_draws_them_in_place():
    import io

    from maskdm.pipeline.launch import CLEAR, relay
    child = (b"DeepSpeed info: chatter\n"
             b"\rtrain:  10%|#  | 1/10\rtrain:  20%|## | 2/10"
             b"\r            \rstep 2/10  loss 0.5\n"
             b"\rtrain:  30%|###| 3/10\rtrain: 100%|###| 10/10\n"
             b"done\n")
    for tty in (True, False):
        log, console = io.StringIO(), io.StringIO()
        relay(io.BufferedReader(io.BytesIO(child)), log, console, tty)
        assert log.getvalue() == ("DeepSpeed info: chatter\nstep 2/10  loss 0.5\n"
                                  "train: 100%|###| 10/10\ndone\n")
        shown = console.getvalue()
        assert "chatter" not in shown and "  step 2/10  loss 0.5\n" in shown
        assert shown.endswith("  done\n")
        assert ("1/10" in shown and "2/10" in shown and CLEAR in shown) == tty


@pytest.mark.slow
def test_the_demo_variants_benchmark_measures_resumes_and_reuses_a_pretraining(tmp_path):
    """`python -m benchmarks.demo_variants --quick`: each variant trains both stages, samples and
    is scored against held-out faces; a variant sharing another's pre-training fine-tunes from
    it; a re-run reads the finished variants back instead of training again."""
    import json
    from tests.conftest import ROOT
    out = tmp_path / "dv"
    cmd = [sys.executable, "-m", "benchmarks.demo_variants", "--quick", "--out", str(out),
           "--variants", "min_snr,min_snr_pretrain_only"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(": pre-training") == 1  # the second variant reuses the first's
    doc = json.loads((out / "results.json").read_text())
    a, b = doc["variants"]
    assert b["pretrain_run"] == a["pretrain_run"] and b["pretrain_s"] is None
    assert b["finetune_sets"] == ["diffusion.loss_weight=uniform"]
    for v in (a, b):
        assert v["n"] == 16 and v["swd_patch"] > 0 and v["swd_image"] > 0
        assert len(list((out / v["variant"] / "samples").glob("*.png"))) == 16
    assert "| min_snr_pretrain_only | shared |" in r.stdout
    assert Image.open(out / "grid.png").size == (16 * 32 * 3, 3 * 32 * 3)
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and ": pre-training" not in again.stdout
    assert ": fine-tuning" not in again.stdout
    assert json.loads((out / "results.json").read_text())["variants"] == doc["variants"]
    bad = subprocess.run(cmd[:-1] + ["min_snr,nope"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown variant(s) nope" in bad.stderr
