"""The GPU acceptance run, rehearsed on this CPU machine (issue 36): a bare venv holding only
torch, everything else installed offline from a wheelhouse made for this machine the way the GPU
box installs its own (wheelhouse_install.sh), then every step in its CPU form. What would break
the one GPU run a task may get breaks here first (it found that training imported mlflow with
tracking off, and that `python -m maskdm` from the checkout shadowed an installed wheel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "wheelhouse-here"


@pytest.mark.slow
def test_the_gpu_acceptance_rehearsal_passes_on_cpu(tmp_path):
    if not (WHEELHOUSE / "SHA256SUMS").exists():
        why = f"{WHEELHOUSE} is missing: python -m benchmarks.wheelhouse --here makes it"
        if os.environ.get("CI"):
            pytest.fail(why + " (the README's test command does, before the tests)")
        pytest.skip(why)
    out = tmp_path / "out"
    env = {**os.environ, "REHEARSE": "1", "OUT": str(out), "BUDGET_S": "900",
           "PYTHON": sys.executable, "SCRATCH": str(tmp_path / "scratch")}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", "benchmarks/gpu_acceptance.sh"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    acc = json.loads((out / "acceptance.json").read_text())
    status = {s["step"]: s["status"] for s in acc["steps"]}
    bad = {s["step"]: s.get("why") for s in acc["steps"] if s["status"] != "ok"}
    assert not bad, bad
    assert {"venv", "install", "shards", "doctor", "data", "sampling", "doctor_run"} <= set(status)
    rows = [k for k in status if k.startswith("train_")]
    assert len(rows) == 3 and set(acc["train"]) == set(rows)
    assert all(acc["train"][k]["e2e_img_s"] > 0 and acc["train"][k]["bare_img_s"] > 0
               for k in rows)
    # what this machine lacks is said with its cost: no xformers here (SDPA in every row)
    assert any(m.startswith("xformers: attention ran on sdpa") for m in acc["missing"]), \
        acc["missing"]
    assert all(acc["train"][k]["attention"] == "sdpa" for k in rows)
    assert "What was missing" in (out / "acceptance.md").read_text()
    # what a device machine sends back: at most 8 files
    assert sorted(p.name for p in out.iterdir()) == ["acceptance.json", "acceptance.md",
                                                     "logs.tar.gz"]
    assert not (tmp_path / "scratch").exists()  # scratch data removed, never in OUT
