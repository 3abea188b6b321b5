"""Crash-safe file writes: write to a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def url_refusal(location: str | os.PathLike, what: str) -> str | None:
    """A message refusing ``location`` if it is a URL (s3://, gs://, http(s)://, ...), else None.
    Object storage is not supported (yet): a URL must never be taken as a local path (it would
    silently become a folder named ``s3:``)."""
    text = str(location)
    if not _URL.match(text):
        return None
    scheme = text.split("://", 1)[0]
    return (f"{what}: {text}: {scheme}:// locations are not supported; maskdm reads and writes "
            f"shards on a local or shared filesystem. Copy them to a local folder first (e.g. "
            f"`aws s3 sync` / `gcloud storage rsync`) and pass that folder")


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: str | os.PathLike) -> Path:
    """The temporary sibling used while ``path`` is being written (unique per process)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (``.NAME.tmp-PID``); returns what was removed."""
    removed = []
    for p in Path(directory).glob(".*.tmp-*"):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
