"""A sharding job killed with SIGKILL and re-run equals an uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--size", "64", "--count", "480", "--samples-per-shard", "40", "--workers", "2", "--quiet"]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "maskdm", "shard", "procedural", str(out), *ARGS]


def _run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _kill_after(out: Path, committed: int) -> int:
    """Start the job, SIGKILL its whole process group once ``committed`` shards are done."""
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    progress = out / ".progress"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if progress.is_dir() and len(list(progress.glob("*.json"))) >= committed:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed; enlarge it"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return len(list(progress.glob("*.json")))


def _snapshot(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in out.iterdir()
             if p.is_file() and p.name not in ("manifest.json", ".lock")}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("created_at")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    r = _run(reference)
    assert r.returncode == 0, r.stderr

    victim = tmp_path / "victim"
    first = _kill_after(victim, committed=3)
    assert not (victim / "manifest.json").exists()
    second = _kill_after(victim, committed=first + 3)  # killed again while resuming
    assert second > first
    r = _run(victim)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout

    assert _snapshot(victim) == _snapshot(reference)
    leftovers = [p.name for p in victim.iterdir() if ".tmp-" in p.name or p.name == ".progress"]
    assert leftovers == []
    verify = subprocess.run([sys.executable, "-m", "maskdm", "shard", "--verify",
                             str(victim), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_workers_exit_when_the_job_is_killed(tmp_path):
    """kill -9 of `maskdm shard` must not leave its worker processes running and writing."""
    proc = subprocess.Popen([sys.executable, "-m", "maskdm", "shard", "procedural",
                             str(tmp_path / "out"), "--size", "64", "--count", "40000",
                             "--samples-per-shard", "20000", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        workers = [c for c in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) == 2, "the sharding job did not start its 2 workers"
    time.sleep(1.0)  # let them get to work
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:  # never leave them behind, even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker(s) {left} kept running after the job was killed"
