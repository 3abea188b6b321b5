"""Run a ``maskdm`` command as a child process, as a user would, for the commands that chain
others (``maskdm demo``, ``maskdm experiment``): its output goes to a log file in full and to the
console indented, without DeepSpeed's start-up chatter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_maskdm(args: list[str], log: Path) -> int:
    """``maskdm ARGS`` -> its exit code; every line is appended to ``log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "maskdm", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            f.write(line)
            if line.strip() and not line.startswith(("DeepSpeed ", "[")):
                print("  " + line.rstrip(), flush=True)
        return proc.wait()
