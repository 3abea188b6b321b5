"""Progress bars: drawn on a terminal, or when a parent ``maskdm`` command (demo, experiment)
relays them to its terminal (it sets MASKDM_PROGRESS=1); never into log files or CI output."""

from __future__ import annotations

import os
import sys

RELAY = "MASKDM_PROGRESS"


def show_progress() -> bool:
    return sys.stderr.isatty() or os.environ.get(RELAY) == "1"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 shard``, ``2 shards``."""
    return f"{n} {word if n == 1 else many or word + 's'}"
