"""Crash-safe file writes: write to a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def url_refusal(location: str | os.PathLike, what: str, *, remote_ok: bool = False) -> str | None:
    """A message refusing ``location`` if it is a URL that cannot be used here, else None. A URL
    is never taken as a local path (it would silently become a folder named ``s3:``). With
    ``remote_ok``, s3://, gs:// and http(s):// folders pass (``shardformat.remote``)."""
    text = str(location)
    if not _URL.match(text):
        return None
    from .remote import SCHEMES
    scheme = text.split("://", 1)[0].lower()
    if remote_ok and scheme in SCHEMES:
        return None
    if scheme in SCHEMES:
        return (f"{what}: {text}: object storage is not supported here (it is for shard "
                f"folders: `maskdm shard ... OUT`, data.shards, --verify, inspect, fid-stats, "
                f"bench data, FID/score references); copy it to a local folder first (e.g. "
                f"`aws s3 sync` / `gcloud storage rsync`) and pass that")
    return (f"{what}: {text}: {scheme}:// locations are not supported; use a local or shared "
            f"filesystem path, or an {', '.join(s + '://' for s in SCHEMES)} URL")


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)"
                       r"(?P<pw>:[^/@\s]*)?@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&](?:[a-z0-9_-]*(?:token|secret|password|passwd|"
                           r"signature|sig|credential|apikey|api_key|key)))=(?P<value>[^&#\s]*)")


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: a password
    (``user:***@``), a bare token in the user part (``***@``), and the values of query
    parameters named like tokens, signatures, keys or passwords. What maskdm writes anywhere (logs,
    configs, meta files, MLflow, folder names) goes through this; the URL itself is used unchanged
    to connect."""
    if "://" not in text and "=" not in text:
        return text

    def userinfo(m):
        if m["pw"]:
            return f"{m['scheme']}{m['user']}:***@"
        return f"{m['scheme']}***@" if m["user"] else m[0]
    text = _USERINFO.sub(userinfo, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}=***", text)


def redact_tree(obj):
    """``redact_url`` on every string of a JSON-like tree (dicts, lists, tuples)."""
    if isinstance(obj, str):
        return redact_url(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj


class RedactFilter:
    """A ``logging`` filter that shows the credentials of URLs in a record's message as ***."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        if "://" in message or "=" in message:
            record.msg, record.args = redact_url(message), ()
        return True


class RedactingStream:
    """A text stream (``sys.stdout``/``sys.stderr``) whose every write goes through
    ``redact_url``: what a command prints (errors naming a shard URL, ``inspect``'s summary)
    never shows a credential inside a URL."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_url(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def plain_name_problem(name: object) -> str | None:
    """Why ``name`` (read from a manifest, a commit record, a bucket listing) is not a plain file
    name inside its folder, or None. Plain: a non-empty string of one path component, not ``.``
    or ``..``, without ``/``, ``\\`` or NUL, at most 255 bytes. Such names are joined to local
    folders, so anything else could reach outside them."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if name in (".", "..") or any(c in name for c in ("/", "\\", "\0")):
        return "is not a plain file name (a path, '.', '..' or a NUL byte)"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than 255 bytes"
    return None


class NotPrivate(PermissionError):
    """A working folder (scratch, cache, staging) that another user owns."""


def private_folder(path: str | os.PathLike, setting: str, *, tighten: bool = False) -> Path:
    """``path`` made if missing (mode 0700, private to this user) and refused (``NotPrivate``,
    naming ``setting``) if another user owns it: on a shared machine whoever creates a folder
    first under /tmp could otherwise read it or plant files that are later trusted (a cached
    checkpoint of the right size is not downloaded again). ``tighten``: for the folders maskdm
    names itself, also refuse a symlink and take group/other permissions away."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat() if tighten else path.stat()
    if tighten and not stat.S_ISDIR(st.st_mode):
        raise NotPrivate(f"{path} is a link or not a folder; remove it (or set {setting} to a "
                         f"folder of your own)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise NotPrivate(f"{path} belongs to another user (uid {st.st_uid}), so its files cannot "
                         f"be trusted; set {setting} to a folder of your own")
    if tighten and st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, mostly: no half-written temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
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
