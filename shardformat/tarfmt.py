"""Deterministic WebDataset tar writing and DALI index files (format ``v1.2``).

Tars are plain ustar with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples
always give the same bytes and the same sha256: an interrupted and resumed job is byte-identical to
an uninterrupted one. The index is written while the tar is written (no second pass, no ``tar``
subprocess), in the layout of DALI's ``wds2idx``: a header ``v1.2 <num_samples>``, then a line per
sample of ``<ext> <data offset> <size> <member name>`` groups.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass

BLOCK = 512
RECORD = 20 * BLOCK
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    ext: str
    offset: int  # byte offset of the data (after the header) inside the tar
    size: int
    name: str


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class TarShardWriter:
    """Streams samples into a tar file, hashing the bytes and recording index entries."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._f = open(path, "wb")
        self._sha = hashlib.sha256()
        self._pos = 0
        self.samples: list[list[Component]] = []

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def add(self, key: str, components: list[tuple[str, bytes]]) -> None:
        """Append one sample: ``components`` are (extension, bytes) pairs written in that order."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty without '.' or '/'")
        entries = []
        for ext, data in components:
            name = f"{key}.{ext}"
            self._write(_header(name, len(data)))
            entries.append(Component(ext, self._pos, len(data), name))
            self._write(data)
            pad = -len(data) % BLOCK
            if pad:
                self._write(b"\0" * pad)
        self.samples.append(entries)

    def close(self) -> tuple[int, str]:
        """Finish the archive (end blocks, record padding), fsync; returns (bytes, sha256 hex)."""
        end = 2 * BLOCK
        end += -(self._pos + end) % RECORD
        self._write(b"\0" * end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._pos, self._sha.hexdigest()

    def abort(self) -> None:
        """Close without finishing (the caller deletes the file). Closing flushes the buffer,
        which fails again on a full disk: that error is not the one to report."""
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass


def format_index(samples: list[list[Component]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for entries in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in entries))
    return "\n".join(lines) + "\n"


class BadIndex(ValueError):
    """An index file that does not parse; the message names the file and line."""


def _index_text(path: str | os.PathLike) -> str:
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadIndex(f"{name}: unreadable ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadIndex(f"{name}: not a DALI index: binary data at byte {e.start} (the file is "
                       f"corrupted or was overwritten)") from None


def read_index(path: str | os.PathLike) -> list[list[Component]]:
    """Read and parse an index file; every problem is a ``BadIndex`` that says what, in words."""
    return parse_index(_index_text(path), os.path.basename(path))


def check_index(path: str | os.PathLike, samples: int, tar_bytes: int) -> None:
    """Cheap whole-file check of an index (header, line count, the last sample's extent) without
    parsing every line: what a loader can afford on every shard at start-up. Raises BadIndex."""
    name = os.path.basename(path)
    n, body = _header_and_body(_index_text(path), name)
    if n != samples:
        raise BadIndex(f"{name}: lists {n} samples, the manifest {samples}")
    end = max(c.offset + c.size for c in _parse_line(body[-1], len(body) + 1, name))
    if end > tar_bytes:
        raise BadIndex(f"{name}: its last sample ends at byte {end}, past the end of the tar "
                       f"({tar_bytes} bytes)")


def _header_and_body(text: str, where: str) -> tuple[int, list[str]]:
    """(sample count from line 1, the non-empty sample lines), checked against each other."""
    lines = text.splitlines()
    if not lines:
        raise BadIndex(f"{where}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise BadIndex(f"{where}: not a DALI index: line 1 should be '{INDEX_VERSION} "
                       f"<num_samples>', got {lines[0][:60]!r}")
    n = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != n:
        raise BadIndex(f"{where}: header says {n} samples but {len(body)} lines follow")
    return n, body


def _parse_line(ln: str, i: int, where: str) -> list[Component]:
    """Line ``i`` of an index: groups of ``ext offset size name``."""
    parts = ln.split()
    if len(parts) % 4:
        raise BadIndex(f"{where}: line {i} is not groups of 'ext offset size name'")
    entries = []
    for j in range(0, len(parts), 4):
        ext, off, size, name = parts[j:j + 4]
        if not (off.isdigit() and size.isdigit()):
            raise BadIndex(f"{where}: line {i}: offset/size must be integers")
        entries.append(Component(ext, int(off), int(size), name))
    return entries


def parse_index(text: str, where: str = "index") -> list[list[Component]]:
    """Parse a ``v1.2`` DALI index into per-sample component lists."""
    _, body = _header_and_body(text, where)
    return [_parse_line(ln, i, where) for i, ln in enumerate(body, start=2)]


def scan_tar(path: str | os.PathLike) -> list[list[Component]]:
    """Walk a tar's headers (no data read) and group members into samples, as wds2idx does."""
    samples: list[list[Component]] = []
    last_key = None
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base = m.name[m.name.rfind("/") + 1:]
            dot = base.find(".")
            if dot <= 0:
                continue
            key = m.name[: m.name.rfind("/") + 1 + dot]
            comp = Component(base[dot + 1:], m.offset_data, m.size, m.name)
            if key != last_key:
                samples.append([comp])
                last_key = key
            else:
                samples[-1].append(comp)
    return samples


def sample_key(entries: list[Component]) -> str:
    name = entries[0].name
    return name[: name.find(".", name.rfind("/") + 1)]
