"""``maskdm doctor --run``: a short real job on this machine's devices, in a temporary folder.

Shards a few hundred procedural images, then runs ``maskdm train`` (~30 steps of the tiny model,
a checkpoint half-way) for each combination that matters here, changing one thing at a time from
the base (torch loader, SDPA, fp32, no compile): the DALI loader, xformers attention, bf16 and
``torch.compile`` where this machine has them. The base run is resumed from its checkpoint, its
EMA weights sample 8 images and those are scored. One line per job: img/s, or the first line of
what went wrong. With ``--nproc N`` every training run goes through ``torchrun`` with N ranks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 30


def combinations(gpu: bool, dali: bool, xformers: bool, full: bool) -> list[tuple[str, list[str]]]:
    base = ["data.backend=torch", "model.attention=sdpa", "train.precision=fp32",
            "train.compile=false"]
    out = [("base: torch loader, sdpa, fp32", base)]

    def vary(label, key, value):
        out.append((label, [s for s in base if not s.startswith(key + "=")] + [f"{key}={value}"]))
    if dali:
        vary("dali loader" + ("" if gpu else " (CPU operators)"), "data.backend", "dali")
    if xformers and gpu:
        vary("xformers attention", "model.attention", "xformers")
    if gpu or full:
        vary("bf16", "train.precision", "bf16")
    if gpu or full:
        vary("torch.compile", "train.compile", "true")
    return out


def _cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc > 1:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, "-m", "maskdm", *args]
    return [sys.executable, "-m", "maskdm", *args]


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("error:", "RuntimeError", "ValueError", "ImportError", "AssertionError",
                          "torch.", "OSError")) or "Error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def _rate(stdout: str) -> float | None:
    rates = [float(x) for x in re.findall(r"([\d.]+) img/s", stdout)]
    return rates[-1] if rates else None


def run(nproc: int = 1, full: bool = False, keep: bool = False, log=print) -> int:
    """-> exit code (1 if any job failed)."""
    import torch

    from maskdm.pipeline.data.dali_loader import dali_available
    from maskdm.preprocessing.shard_job import ShardOptions
    from maskdm.preprocessing.shard_job import run as shard
    from maskdm.shardformat.fsutil import atomic_write_text
    gpu = torch.cuda.is_available()
    try:
        import xformers.ops as _xops
        del _xops
        have_xf = True
    except Exception:
        have_xf = False
    root = Path(tempfile.mkdtemp(prefix="maskdm-doctor-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI="")
    env.pop("MLFLOW_TRACKING_URI")
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    failed = 0
    t_all = time.time()
    try:
        t0 = time.time()
        shards = root / "shards"
        shard(ShardOptions(src="procedural", out=str(shards), source="procedural", size=32,
                           count=384, samples_per_shard=128, workers=1, keep_jpeg=False),
              progress=False, log=lambda *a: None)
        log(f"  OK    shard 384 procedural images        {time.time() - t0:5.1f} s")
        cfg = root / "doctor.yaml"
        atomic_write_text(cfg, DOCTOR_CONFIG.format(steps=STEPS, device="cuda" if gpu else "cpu"))
        jobs = combinations(gpu, dali_available(), have_xf, full)
        for i, (label, sets) in enumerate(jobs):
            run_dir = root / f"run{i}"
            args = ["train", "--config", str(cfg), "--set", f"data.shards={shards}",
                    "--set", f"train.run_dir={run_dir}", *[a for s in sets for a in ("--set", s)]]
            t0 = time.time()
            r = subprocess.run(_cmd(nproc, args), env=env, capture_output=True, text=True)
            dt = time.time() - t0
            if r.returncode == 0:
                rate = _rate(r.stdout)
                log(f"  OK    {label:34s} {dt:5.1f} s  {rate or 0:8.1f} img/s")
            else:
                failed += 1
                log(f"  FAIL  {label:34s} {dt:5.1f} s  {_first_error(r.stdout + r.stderr)}")
            if i == 0 and r.returncode == 0:
                failed += _resume_sample_score(root, cfg, shards, run_dir, sets, nproc, env, log)
    finally:
        if keep:
            log(f"  (kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    log(f"{'FAIL' if failed else 'OK'}: {failed} job(s) failed; {time.time() - t_all:.0f} s in all")
    return 1 if failed else 0


def _resume_sample_score(root, cfg, shards, run_dir, sets, nproc, env, log) -> int:
    failed = 0
    steps = [
        ("resume from the checkpoint", _cmd(nproc, [
            "train", "--config", str(cfg), "--set", f"data.shards={shards}",
            "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={STEPS + 10}",
            *[a for s in sets for a in ("--set", s)], "--resume", "auto"]), "resumed from"),
        ("sample 8 images (EMA, DDIM 10)", [sys.executable, "-m", "maskdm", "sample", "--ckpt",
                                            str(run_dir), "--n", "8", "--steps", "10", "--out",
                                            str(root / "samples")], None),
        ("score them (SWD)", [sys.executable, "-m", "maskdm", "score", "--samples",
                              str(root / "samples"), "--ref", str(shards)], None),
    ]
    for label, cmd, expect in steps:
        t0 = time.time()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ok = r.returncode == 0 and (expect is None or expect in r.stdout)
        dt = time.time() - t0
        if ok:
            note = _score_line(r.stdout) if "score" in label else ""
            log(f"  OK    {label:34s} {dt:5.1f} s  {note}")
        else:
            failed += 1
            log(f"  FAIL  {label:34s} {dt:5.1f} s  {_first_error(r.stdout + r.stderr)}")
    return failed


def _score_line(stdout: str) -> str:
    import json
    try:
        s = json.loads(stdout.strip().splitlines()[-1])
        return f"SWD x1e3 patches {s['swd_patch']:.0f}, images {s['swd_image']:.0f} (untrained)"
    except (ValueError, KeyError, IndexError):
        return ""


DOCTOR_CONFIG = """\
# maskdm doctor --run: the tiny model, a few seconds per job
data:
  workers: 1
model:
  preset: tiny
mask:
  kind: block
  ratio: 0.5
  block_size: 2
optim:
  lr: 1.0e-3
  warmup_steps: 2
train:
  steps: {steps}
  global_batch: 16
  zero_stage: 1
  ckpt_every: 15
  log_every: 10
  sample_n: 4
  device: {device}
tracking:
  enabled: false
eval:
  steps: 4
"""
