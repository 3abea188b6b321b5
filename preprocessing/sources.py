"""What to shard: enumerate a source into an ordered list of items, and load one item's bytes.

Kinds:
- ``celebahq``: a folder (searched recursively) or a ``.zip`` of images;
- ``vggface2``: ``ROOT/<split>/<identity>/<image>.jpg`` (or ``ROOT`` = the split folder itself);
  identities become integer labels in sorted order; optional loose face boxes from ``--bbox-csv``;
- ``folder``: any folder, recursively (symlinked files are followed, symlinked folders are not);
- ``procedural``: ``count`` images from ``preprocessing.procedural`` (no files at all).
Enumeration is sorted, so the same source always gives the same list.

A folder or a ``.zip`` may also be an ``s3://``, ``gs://`` or ``http(s)://`` URL (a bucket
holding the raw dataset): it is listed once and each worker reads its inputs through the store
layer (``shardformat.remote``: request timeouts, an outage waited out for
``StoreOptions.patience_s`` and then the job stopped, never an input skipped for it; credentials
from the environment), a few inputs ahead of the conversion (``READ_AHEAD``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import procedural
from .images import Skip, read_file, too_large

IMAGE_EXTS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
              ".ppm", ".pgm", ".pnm"}
KINDS = ("celebahq", "vggface2", "folder", "procedural")


def name_record(ref: str, key: str = "src") -> dict[str, str]:
    """How a source name is written to JSON (sample json, ``skipped.jsonl``), losslessly.

    File names are bytes on POSIX; Python hands over undecodable bytes as lone surrogates
    (``surrogateescape``), which strict JSON readers refuse. ``src`` is always valid UTF-8 (such
    bytes shown as ``\\xff``); when the name is not valid UTF-8, ``src_hex`` holds its exact bytes.
    """
    raw = ref.encode("utf-8", "surrogateescape")
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: raw.decode("utf-8", "backslashreplace"), f"{key}_hex": raw.hex()}


def _fs_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class SourceError(RuntimeError):
    """The source cannot be read at all (as opposed to one bad image, which is skipped)."""


@dataclass(frozen=True)
class Item:
    ref: str  # path relative to the source root, zip member, or "procedural/<index>"
    size: int  # file size in bytes (-1 if unknown, e.g. a broken symlink); 0 for procedural
    label: int | None = None
    identity: str | None = None
    bbox: tuple[float, float, float, float] | None = None


@dataclass
class Source:
    kind: str
    root: str  # absolute path ("" for procedural)
    items: list[Item]
    labels: dict[str, int] | None = None
    ignored: dict[str, int] = field(default_factory=dict)  # extension -> count of non-image files
    gen_seed: int = 0
    image_size: int = 0  # procedural render size
    url: str = ""  # a source in a bucket: its URL as given (``root`` shows it redacted)

    def fingerprint(self) -> str:
        """Hash of the enumerated inputs: a resumed job must see the same list."""
        h = hashlib.sha256(_fs_bytes(f"{self.kind}|{self.root}|{self.gen_seed}|{self.image_size}"))
        for it in self.items:
            h.update(_fs_bytes(f"{it.ref}|{it.size}|{it.label}|{it.bbox}\n"))
        return h.hexdigest()

    def loader(self) -> "ItemLoader":
        return ItemLoader(self.kind, self.root, self.gen_seed, self.image_size, url=self.url)


READ_AHEAD = 8  # inputs a worker fetches ahead from a source in a bucket


class ItemLoader:
    """Picklable: opened once per worker process; ``load(item)`` gives bytes or a uint8 array."""

    def __init__(self, kind: str, root: str, gen_seed: int, image_size: int, url: str = ""):
        self.kind, self.root, self.gen_seed, self.image_size = kind, root, gen_seed, image_size
        self.url = url
        self._zip = None
        self._store = None

    def __getstate__(self):
        return {"kind": self.kind, "root": self.root, "gen_seed": self.gen_seed,
                "image_size": self.image_size, "url": self.url}

    def __setstate__(self, state):
        self.__dict__.update({"url": "", **state})
        self._zip = None
        self._store = None

    @property
    def remote(self) -> bool:
        return bool(self.url)

    def fetching(self, items: list[Item], max_bytes: int | None):
        """(item, bytes or the ``Skip`` it raised) for ``items`` in order, read ``READ_AHEAD``
        ahead in threads when the source is in a bucket (a folder; a zip is read in order)."""
        if not self.remote or self.url.lower().rstrip("/").endswith(".zip"):
            for item in items:
                yield item, None  # loaded when converted
            return
        from concurrent.futures import ThreadPoolExecutor

        def get(item):
            try:
                return self.load(item, max_bytes)
            except Skip as e:
                return e
        with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="maskdm-source") as pool:
            ahead = [pool.submit(get, it) for it in items[:READ_AHEAD]]
            for i, item in enumerate(items):
                if i + READ_AHEAD < len(items):
                    ahead.append(pool.submit(get, items[i + READ_AHEAD]))
                yield item, ahead[i].result()  # a store that stayed down: raised here
                ahead[i] = None

    def _remote(self):
        if self._store is None:
            from maskdm.shardformat.patience import Patience, StoreOptions
            from maskdm.shardformat.remote import filesystem
            fs, path = filesystem(self.url.rstrip("/"))
            self._store = (fs, path.rstrip("/"),
                           Patience(self.root, StoreOptions(), what_pauses="sharding"))
        return self._store

    def _load_remote(self, item: Item, max_bytes: int | None) -> bytes:
        from maskdm.shardformat.remote import TooLarge, read_capped
        fs, path, patience = self._remote()
        too_large(item.size, max_bytes)  # its listed size: skipped unread
        limit = max_bytes if max_bytes is not None else item.size
        try:
            return patience.call(lambda: read_capped(fs, f"{path}/{item.ref}", max(limit, 0),
                                                     f"{self.root}/{item.ref}"), item.ref)
        except FileNotFoundError:
            raise Skip("gone from the source since it was listed") from None
        except TooLarge:
            too_large(max(limit, 0) + 1, max_bytes)
            raise Skip("larger than when it was listed") from None

    def load(self, item: Item, max_bytes: int | None = None) -> bytes | np.ndarray:
        """The item's bytes (or pixels); a file or zip member over ``max_bytes`` is skipped before
        it is read (its size as stored, and what it really inflates to)."""
        if self.kind == "procedural":
            index = int(item.ref.rsplit("/", 1)[1])
            return procedural.render(self.gen_seed, index, self.image_size)
        zipped = self.url.lower().rstrip("/").endswith(".zip") if self.remote else \
            self.root.endswith(".zip") and os.path.isfile(self.root)
        if self.remote and not zipped:
            return self._load_remote(item, max_bytes)
        if zipped:
            if self._zip is None:
                if self.remote:
                    fs, path, _ = self._remote()
                    self._zip = zipfile.ZipFile(fs.open(path, "rb", block_size=2 ** 20))
                else:
                    self._zip = zipfile.ZipFile(self.root)
            try:
                too_large(self._zip.getinfo(item.ref).file_size, max_bytes)
                with self._zip.open(item.ref) as f:
                    data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
                too_large(len(data), max_bytes)  # a member whose header understates its size
                return data
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, KeyError) as e:
                raise Skip(f"corrupt zip member ({type(e).__name__}: {e})") from None
        return read_file(os.path.join(self.root, item.ref), max_bytes)


def _walk(root: Path, exclude: Path | None, ignored: dict[str, int]):
    """Yield (relative path, size) of image files under ``root``, sorted; count the rest."""
    out = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise SourceError(f"cannot list {d}: {e.strerror or e}") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                if exclude is None or path.resolve() != exclude:
                    stack.append(path)
                continue
            ext = os.path.splitext(e.name)[1].lower()
            if ext not in IMAGE_EXTS:
                if not e.is_dir():  # symlinks to folders are not followed and not counted
                    ignored[ext or "(none)"] = ignored.get(ext or "(none)", 0) + 1
                continue
            try:
                size = e.stat(follow_symlinks=True).st_size
            except OSError:
                size = -1  # broken symlink or unreadable: the worker reports why
            out.append((path.relative_to(root).as_posix(), size))
    out.sort()
    return out


def _zip_items(infos: list[zipfile.ZipInfo], ignored: dict[str, int]) -> list[Item]:
    """The image members of a zip, sorted; the others counted in ``ignored`` by extension."""
    items = []
    for info in infos:
        if info.is_dir() or os.path.basename(info.filename).startswith("."):
            continue
        ext = os.path.splitext(info.filename)[1].lower()
        if ext in IMAGE_EXTS:
            items.append(Item(info.filename, info.file_size))
        else:
            ignored[ext or "(none)"] = ignored.get(ext or "(none)", 0) + 1
    items.sort(key=lambda it: it.ref)
    return items


def _bboxes(csv_path: str) -> dict[str, tuple[float, float, float, float]]:
    """VGGFace2 loose boxes: rows ``NAME_ID,X,Y,W,H`` with NAME_ID like ``n000002/0001_01``."""
    boxes = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or (lineno == 1 and row[0].strip().upper() == "NAME_ID"):
                    continue
                if len(row) != 5:
                    raise SourceError(f"{csv_path}:{lineno}: expected NAME_ID,X,Y,W,H, got {row!r}")
                try:
                    x, y, w, h = (float(v) for v in row[1:])
                except ValueError:
                    raise SourceError(f"{csv_path}:{lineno}: X,Y,W,H must be numbers, got {row!r}") from None
                boxes[row[0].strip()] = (x, y, w, h)
    except OSError as e:
        raise SourceError(f"cannot read --bbox-csv {csv_path}: {e.strerror or e}") from None
    return boxes


def scan(kind: str, src: str, *, exclude: str | None = None, count: int = 0, gen_seed: int = 0,
         image_size: int = 0, split: str = "train", bbox_csv: str | None = None) -> Source:
    """Enumerate ``src`` as a ``kind`` source. Raises SourceError if it cannot be read at all."""
    if kind not in KINDS:
        raise SourceError(f"unknown --source {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "procedural":
        if count <= 0:
            raise SourceError("--count must be positive for the procedural source")
        items = [Item(f"procedural/{i:09d}", 0) for i in range(count)]
        return Source(kind, "", items, gen_seed=gen_seed, image_size=image_size)

    from maskdm.shardformat.remote import is_remote
    if is_remote(src):
        return _scan_remote(kind, src, split=split, bbox_csv=bbox_csv)
    root = Path(src).expanduser().resolve()
    if not root.exists():
        raise SourceError(f"source {src} does not exist")
    excl = Path(exclude).resolve() if exclude else None
    ignored: dict[str, int] = {}

    if kind == "celebahq" and root.is_file():
        if root.suffix.lower() != ".zip":
            raise SourceError(f"{src}: a celebahq source is a folder or a .zip of images")
        try:
            with zipfile.ZipFile(root) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"{src}: cannot open the zip ({e})") from None
        items = _zip_items(infos, ignored)
        return Source(kind, str(root), items, ignored=ignored)

    if not root.is_dir():
        raise SourceError(f"{src} is not a folder")

    if kind == "vggface2":
        split_dir = root / split
        base = split_dir if split_dir.is_dir() else root
        ids = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not ids:
            raise SourceError(f"{base}: no identity folders found; VGGFace2 is laid out as "
                              f"ROOT/{split}/<identity>/<image>.jpg")
        labels = {name: i for i, name in enumerate(ids)}
        boxes = _bboxes(bbox_csv) if bbox_csv else {}
        items = []
        for rel, size in _walk(base, excl, ignored):
            parts = rel.split("/")
            if len(parts) != 2:
                ignored["(outside identity folders)"] = ignored.get("(outside identity folders)", 0) + 1
                continue
            ident = parts[0]
            name_id = os.path.splitext(rel)[0]
            ref = rel if base == root else f"{split}/{rel}"
            items.append(Item(ref, size, labels[ident], ident, boxes.get(name_id)))
        return Source(kind, str(root), items, labels=labels, ignored=ignored)

    items = [Item(rel, size) for rel, size in _walk(root, excl, ignored)]
    return Source(kind, str(root), items, ignored=ignored)


def _scan_remote(kind: str, url: str, *, split: str, bbox_csv: str | None) -> Source:
    """A folder (listed recursively) or a ``.zip`` in a bucket, enumerated as ``scan`` does a
    local one (the same refs, so the same shards)."""
    from maskdm.shardformat.fsutil import redact_url
    from maskdm.shardformat.patience import Patience, RemoteError, StoreOptions
    from maskdm.shardformat.remote import filesystem
    shown = redact_url(url.rstrip("/"))
    try:
        fs, path = filesystem(url.rstrip("/"))
    except ValueError as e:
        raise SourceError(str(e)) from None
    path = path.rstrip("/")
    patience = Patience(shown, StoreOptions(), what_pauses="sharding")

    def call(what, fn):
        try:
            return patience.call(fn, what)
        except RemoteError as e:
            raise SourceError(str(e)) from None
        except FileNotFoundError:
            raise SourceError(f"source {shown} does not exist (no such bucket, prefix or "
                              f"object); check the URL") from None
    ignored: dict[str, int] = {}
    if shown.lower().endswith(".zip"):
        if kind not in ("celebahq", "folder"):
            raise SourceError(f"{shown}: a zip source is --source celebahq (or folder)")

        def members():
            with fs.open(path, "rb", block_size=2 ** 20) as f, zipfile.ZipFile(f) as z:
                return z.infolist()
        try:
            infos = call("listing", members)
        except zipfile.BadZipFile as e:
            raise SourceError(f"{shown}: cannot open the zip ({e})") from None
        items = _zip_items(infos, ignored)
        return Source(kind, shown, items, ignored=ignored, url=url)
    listed = call("listing", lambda: fs.find(path, detail=True))
    files = []
    for name, info in listed.items():
        if info.get("type", "file") != "file":
            continue
        rel = name[len(path):].lstrip("/")
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        ext = os.path.splitext(rel)[1].lower()
        if ext not in IMAGE_EXTS:
            ignored[ext or "(none)"] = ignored.get(ext or "(none)", 0) + 1
            continue
        files.append((rel, int(info.get("size") or 0)))
    if not files and not ignored:
        raise SourceError(f"source {shown} does not exist or holds no files; check the URL")
    files.sort()
    if kind != "vggface2":
        return Source(kind, shown, [Item(rel, size) for rel, size in files], ignored=ignored,
                      url=url)
    in_split = any(rel.startswith(f"{split}/") for rel, _ in files)
    base = f"{split}/" if in_split else ""
    ids = sorted({rel[len(base):].split("/")[0] for rel, _ in files
                  if rel.startswith(base) and len(rel[len(base):].split("/")) == 2})
    if not ids:
        raise SourceError(f"{shown}: no identity folders found; VGGFace2 is laid out as "
                          f"ROOT/{split}/<identity>/<image>.jpg")
    labels = {name: i for i, name in enumerate(ids)}
    boxes = _bboxes(bbox_csv) if bbox_csv else {}
    items = []
    for rel, size in files:
        inner = rel[len(base):].split("/") if rel.startswith(base) else []
        if len(inner) != 2:
            ignored["(outside identity folders)"] = ignored.get("(outside identity folders)", 0) + 1
            continue
        name_id = os.path.splitext("/".join(inner))[0]
        items.append(Item(rel, size, labels[inner[0]], inner[0], boxes.get(name_id)))
    return Source(kind, shown, items, labels=labels, ignored=ignored, url=url)
