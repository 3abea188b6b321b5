"""`maskdm bench train`: it runs the real loop, and its table is consistent (never its timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shard_set
from tests.test_train import CONFIG, _env


@pytest.mark.slow
def test_bench_train_runs_and_its_parts_add_up(tmp_path):
    shards = shard_set(tmp_path, "s", count=64, samples_per_shard=32)
    out = tmp_path / "row.json"
    r = subprocess.run([sys.executable, "-m", "maskdm", "bench", "train", "--config", CONFIG,
                        "--set", f"data.shards={shards}", "--set", "train.ckpt_every=4",
                        "--steps", "4", "--warmup", "1", "--json", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = json.loads(out.read_text())
    parts = row["parts_s"]
    assert set(parts) == {"data", "randomness", "forward", "backward", "optimizer", "ema",
                          "logging", "checkpoint", "other"}
    assert all(v >= 0 for k, v in parts.items() if k != "other")
    assert abs(sum(parts.values()) - row["breakdown_step_s"]) < 1e-9
    assert abs(parts["checkpoint"] - row["ckpt_s"] / 4) < 1e-9  # amortised over ckpt_every
    assert abs(row["ratio"] - row["e2e_img_s"] / row["bare_img_s"]) < 1e-9
    assert abs(row["e2e_img_s"] - row["batch"] / row["e2e_step_s"]) < 1e-6
    assert row["batch"] == 8 and row["preset"] == "tiny" and row["gpu_peak_gib"] is None
    # the printed table says the same, and the training loop's own console lines stay out
    assert f"{row['e2e_img_s']:.1f}" in r.stdout and f"{row['ratio']:.1%}" in r.stdout
    assert "step 5/" not in r.stdout and "checkpoint /" not in r.stdout
    assert "INFO mlflow" not in r.stdout + r.stderr


def test_bench_train_refuses_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "maskdm", "bench", "train", "--config", CONFIG,
                        "--set", f"data.shards={tmp_path / 'missing'}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "data.shards" in r.stderr and "Traceback" not in r.stderr
