"""Packaging: everything installs under the one namespace ``maskdm``; nothing named ``model``,
``pipeline`` or ``preprocessing`` is importable from outside the source tree; a regular (wheel)
install carries every module and the DeepSpeed JSON files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_maskdm_namespace_is_importable(tmp_path):
    code = ("import importlib.util as u, maskdm.pipeline.cli, maskdm.shardformat.reader;"
            "print([n for n in ('model', 'pipeline', 'preprocessing', 'shardformat') "
            "if u.find_spec(n) is not None])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


LAYERS = ("maskdm", "model", "pipeline", "preprocessing", "shardformat", "deepspeed_configs")


def test_wheel_holds_the_namespace_and_the_deepspeed_configs(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    for name in LAYERS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("maskdm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"maskdm"}, top
    for needed in ("maskdm/model/uvit.py", "maskdm/pipeline/train.py",
                   "maskdm/pipeline/data/loader.py", "maskdm/pipeline/eval/fid.py",
                   "maskdm/preprocessing/shard_job.py", "maskdm/shardformat/reader.py",
                   "maskdm/deepspeed_configs/zero2_bf16.json", "maskdm/__main__.py"):
        assert needed in names, needed
    sources = {p.relative_to(ROOT).as_posix() for d in ("model", "pipeline", "preprocessing",
                                                          "shardformat", "deepspeed_configs")
               for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert {f"maskdm/{s}" for s in sources} <= set(names)


def test_the_gpu_acceptance_script_parses_and_budgets_every_step():
    """benchmarks/gpu_acceptance.sh runs only where a GPU is lent: here, its syntax and that every
    step goes through the budgeted `step` helper."""
    import shutil
    import subprocess
    script = ROOT / "benchmarks" / "gpu_acceptance.sh"
    bash = shutil.which("bash")
    assert bash and subprocess.run([bash, "-n", str(script)]).returncode == 0
    text = script.read_text()
    calls = [ln for ln in text.splitlines() if "-m maskdm " in ln and not ln.lstrip().startswith("#")]
    assert calls and all("step " in ln or ln.startswith(("  $PY -m maskdm shard", "      "))
                         for ln in calls), calls
