"""Run a ``maskdm`` command as a child process, as a user would, for the commands that chain
others (``maskdm demo``, ``maskdm experiment``): its output goes to a log file in full and to the
console indented, without DeepSpeed's start-up chatter. On a terminal, the child's progress bars
are relayed too (redrawn in place on one line; never written to the log)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from maskdm.console import RELAY

CLEAR = "\r\x1b[K"


def _quiet(line: str) -> bool:
    return not line.strip() or line.startswith(("DeepSpeed ", "["))


def run_maskdm(args: list[str], log: Path) -> int:
    """``maskdm ARGS`` -> its exit code; every line is appended to ``log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    tty = sys.stdout.isatty()
    if tty:
        env[RELAY] = "1"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "maskdm", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
        relay(proc.stdout, f, sys.stdout, tty)
        return proc.wait()


def relay(stream, log, console, tty: bool) -> None:
    """Copy a child's output: whole lines to ``log`` and (indented) to ``console``; the pieces
    ending in a carriage return (progress bar redraws) only to a terminal, in place."""
    bar_shown = False

    def line_out(line: str) -> None:
        nonlocal bar_shown
        log.write(line + "\n")
        if not _quiet(line):
            console.write((CLEAR if bar_shown else "") + "  " + line.rstrip() + "\n")
            console.flush()
            bar_shown = False

    pending = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        pending += chunk
        parts = re.split(rb"(\r\n|\r|\n)", pending)
        pending = parts.pop()  # the unfinished tail
        for text, end in zip(parts[::2], parts[1::2]):
            line = text.decode(errors="replace")
            if end != b"\r":
                line_out(line)
            elif tty and line.strip():  # a redraw of a bar
                console.write(CLEAR + "  " + line.strip())
                console.flush()
                bar_shown = True
    if pending:
        line_out(pending.decode(errors="replace"))
    if bar_shown:
        console.write(CLEAR)
    console.flush()
