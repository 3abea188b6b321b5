"""`maskdm doctor`: the report of this machine, what a config needs (FAIL only on that, each
with its fix), JSON for scripts, and the short real job of `--run` (the CPU half here; the GPU
half runs where there is a GPU)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from tests.conftest import ROOT, shard_set

CONFIG = str(ROOT / "configs" / "test_tiny.yaml")


def _doctor(capsys, *argv) -> tuple[int, str]:
    from maskdm.pipeline.cli import main
    code = main(["doctor", *argv])
    return code, capsys.readouterr().out


def test_the_machine_report_has_a_line_per_check(capsys):
    code, out = _doctor(capsys)
    assert code == 0, out
    for name in ("python", "torch", "gpus", "distributed", "deepspeed", "dali", "xformers",
                 "cpu cores"):
        assert any(re.match(rf"\s+(OK|WARN|FAIL)\s+{re.escape(name)}\s", line)
                   for line in out.splitlines()[1:]), (name, out)
    assert out.splitlines()[0].startswith("maskdm doctor on ")


def test_with_a_config_what_it_needs_fails_with_its_fix(capsys, tmp_path, monkeypatch):
    shards = shard_set(tmp_path, "s", count=40, samples_per_shard=20)
    code, out = _doctor(capsys, "--config", CONFIG, "--set", f"data.shards={shards}",
                        "--set", f"train.run_dir={tmp_path / 'run'}")
    assert code == 0 and "OK    shards" in out and "shard-000000.tar read and checked" in out, out
    # an unreachable tracking server: FAIL and how to fix it, exit code 1
    code, out = _doctor(capsys, "--config", CONFIG, "--set", f"data.shards={shards}",
                        "--set", "tracking.enabled=true",
                        "--set", "tracking.uri=http://127.0.0.1:9")
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["FAIL", "mlflow"])
    assert code == 1 and "does not answer" in lines[i] and "fix: start the server" in lines[i + 1]
    # a shard folder that is not there
    code, out = _doctor(capsys, "--config", CONFIG, "--set", f"data.shards={tmp_path / 'none'}",
                        "--json")
    report = json.loads(out)
    (shard,) = [c for c in report["checks"] if c["name"] == "shards"]
    assert code == 1 and not report["ok"] and shard["status"] == "FAIL"
    assert "maskdm shard --verify" in shard["fix"]
    # a missing package is a FAIL only for the config that needs it (the import fails for real)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setattr("maskdm.pipeline.doctor._dali_dist", lambda: None)
    code, out = _doctor(capsys, "--json")
    (dali,) = [c for c in json.loads(out)["checks"] if c["name"] == "dali"]
    assert dali["status"] == "WARN" and "pip install 'maskdm[" in dali["fix"]
    code, out = _doctor(capsys, "--config", CONFIG, "--set", f"data.shards={shards}",
                        "--set", "data.backend=dali", "--json")
    (dali,) = [c for c in json.loads(out)["checks"] if c["name"] == "dali"]
    assert code == 1 and dali["status"] == "FAIL"


@pytest.mark.slow
def test_doctor_run_trains_resumes_samples_and_scores_on_the_cpu(capsys):
    code, out = _doctor(capsys, "--run")
    assert code == 0, out
    for job in ("shard 384 procedural images", "base: torch loader, sdpa, fp32",
                "resume from the checkpoint", "sample 8 images", "score them (SWD)"):
        assert any(ln.startswith("  OK") and job in ln for ln in out.splitlines()), (job, out)
    assert "OK: 0 job(s) failed" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU half of "
                    "doctor: bf16, torch.compile, xformers, DALI GPU decode)")
def test_doctor_run_on_a_gpu_tries_every_combination(capsys):
    code, out = _doctor(capsys, "--run")
    assert code == 0, out
    assert "bf16" in out and "torch.compile" in out
