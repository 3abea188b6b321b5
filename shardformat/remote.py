"""Shard folders in object storage (s3://, gs://, http(s)://), read through a bounded local cache.

A remote folder holds exactly what a local one does (``manifest.json``, ``shard-NNNNNN.tar`` and
``.idx``). Nothing reads remote bytes directly: ``RemoteShards.fetch(name)`` returns the path of a
verified copy in the node's cache folder, downloading it first if it is not there. A download goes
to a hidden ``.part`` file, is checked against the manifest (size, and sha256 for shards) and only
then renamed to its name, so a reader never sees a partial or wrong file. Every process of a node
(ranks, DataLoader workers, the download-ahead thread) shares one cache folder.

Shards are downloaded one at a time per cache folder (a node-wide lock, the *slot*), and the slot
holder evicts least recently used shards before it downloads, so the shards in the cache never
exceed ``data.cache_limit_gb`` and the folder holds at most that plus the one shard being
downloaded, whoever downloads (the download-ahead thread, a reader, a retry after an outage).
Indexes and the manifest are small, never evicted and fetched in parallel.

Faults (``patience.py``): an unreachable store is waited out for ``data.remote_patience_s``, never
skipped; an object that is not what the manifest says raises ``RemoteDamaged`` (the reader treats
its shard as damaged, ``data.strict`` decides).

Filesystems come from fsspec: s3:// needs ``s3fs`` (``pip install 'maskdm[s3]'``), gs:// ``gcsfs``
(``maskdm[gcs]``), http(s):// ``aiohttp``. Credentials come from each store's usual environment and
config files (``AWS_*`` / ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from maskdm's
configs, and are never logged; ``AWS_ENDPOINT_URL`` points s3:// at an S3-compatible server.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .fsutil import NotPrivate, private_folder, redact_url, sha256_file
from .manifest import DatasetError
from .patience import (  # noqa: F401  (re-exported: the errors callers catch)
    CacheFull,
    Patience,
    RemoteDamaged,
    RemoteError,
    RemoteUnreachable,
    StoreOptions,
)

# scheme -> (the package fsspec needs for it, the extra that installs it)
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
           "http": ("aiohttp", "http"), "https": ("aiohttp", "http")}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(location) -> str | None:
    """``s3`` for ``s3://bucket/x``; None for a local path."""
    m = _URL.match(str(location))
    return m.group(1).lower() if m else None


def is_remote(location) -> bool:
    return url_scheme(location) is not None


def default_cache_dir() -> Path:
    return Path(os.environ.get("MASKDM_CACHE") or Path.home() / ".cache" / "maskdm" / "shards")


@dataclass
class CacheOptions:
    """Where a node keeps the shards it reads from object storage (``data.cache_dir``,
    ``data.cache_limit_gb``; 0: no limit) and how long it waits for the store
    (``data.remote_patience_s``, ``data.remote_timeout_s``)."""

    dir: str | None = None
    limit_gb: float = 0.0
    patience_s: float = 1800.0
    timeout_s: float = 60.0
    backoff: float = 0.5  # the first wait between attempts; doubles up to backoff_cap
    backoff_cap: float = 30.0

    @property
    def limit_bytes(self) -> int | None:
        return int(self.limit_gb * 2 ** 30) if self.limit_gb > 0 else None

    @property
    def store(self) -> StoreOptions:
        return StoreOptions(self.patience_s, self.timeout_s, self.backoff, self.backoff_cap)


def filesystem(url: str, timeout_s: float = 60.0):
    """-> (fsspec filesystem, path inside it) for ``url``, or ValueError saying what to install.
    Every request has a timeout (connect, and each read): a stalled connection fails, never
    hangs; retries are ours (``Patience``), not the client's."""
    scheme = url_scheme(url)
    if scheme not in SCHEMES:
        raise ValueError(f"{url}: {scheme}:// locations are not supported; use a local or shared "
                         f"filesystem path, or an {', '.join(s + '://' for s in SCHEMES)} URL")
    try:
        import fsspec
        kwargs = {"skip_instance_cache": True}  # each folder its own client (endpoint, env)
        if scheme == "s3":
            kwargs["config_kwargs"] = {"retries": {"max_attempts": 1},
                                       "connect_timeout": timeout_s, "read_timeout": timeout_s}
        elif scheme in ("http", "https", "gs", "gcs"):
            import aiohttp
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                            sock_read=timeout_s)
            kwargs["client_kwargs" if scheme.startswith("http") else "session_kwargs"] = \
                {"timeout": timeout}
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
        if hasattr(fs, "retries"):
            fs.retries = 1
        return fs, path
    except ImportError as e:
        package, extra = SCHEMES[scheme]
        raise ValueError(f"{url}: reading {scheme}:// needs the {package} package ({e}); "
                         f"pip install 'maskdm[{extra}]'") from None


# The most a small file read from a store may hold: a manifest (a few hundred bytes per shard),
# a commit record, a job record. Anything larger is not what maskdm wrote there.
SMALL_FILE_MAX = 256 * 2 ** 20


class TooLarge(RemoteDamaged):
    """The store sent more bytes than the object may hold (its listed size, or a cap)."""


def size_cap(limit: int, what: str):
    """An fsspec callback for ``get_file`` that stops a download past ``limit`` bytes (a store
    announcing more, or streaming on past it), instead of filling the disk or a retry loop."""
    from fsspec.callbacks import Callback

    class Cap(Callback):
        def _refuse(self, n):
            raise TooLarge(f"{what}: the store sent {'at least ' if n > limit else ''}{n} bytes, "
                           f"more than the {limit} it may hold; refusing it (a damaged or "
                           f"hostile store: check the URL)")

        def set_size(self, size):
            if size is not None and int(size) > limit:
                self._refuse(int(size))

        def relative_update(self, inc=1):
            self.value += inc
            if self.value > limit:
                self._refuse(self.value)
    return Cap()


def read_capped(fs, path: str, limit: int, what: str) -> bytes:
    """A whole small object, never more than ``limit`` bytes read (TooLarge past it): ranged
    for object stores, streamed (and counted) for http(s), whose server may ignore ranges."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("http", "https"):
        data = fs.cat_file(path, start=0, end=limit + 1)
        if len(data) > limit:
            raise TooLarge(f"{what}: more than {limit} bytes in the store; refusing it")
        return data
    chunks, n = [], 0
    # (a size given: no HEAD first, whose every failure fsspec reports as "not found")
    with fs.open(path, "rb", block_size=0, size=limit + 1) as f:
        while True:
            chunk = f.read(min(1 << 20, limit + 1 - n))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            n += len(chunk)
            if n > limit:
                raise TooLarge(f"{what}: more than {limit} bytes sent by the store; refusing it")


class RemoteShards:
    """One remote shard folder and its cache folder on this node."""

    def __init__(self, url: str, cache: CacheOptions | None = None):
        self.url = str(url).rstrip("/")
        self.options = cache or CacheOptions()
        self._fs, self.root = filesystem(self.url, self.options.timeout_s)
        self._pid = os.getpid()
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        base = Path(self.options.dir) if self.options.dir else default_cache_dir()
        # the folder's name and SOURCE say where it came from, never with credentials
        name = Path(redact_url(str(self.root))).name.replace("*", "") or "root"
        self.dir = base / f"{name}-{key}"
        try:
            private_folder(self.dir, "data.cache_dir (or MASKDM_CACHE)")
            (self.dir / ".locks").mkdir(parents=True, exist_ok=True)
        except NotPrivate as e:
            raise DatasetError(f"shard cache: {e}") from None
        except OSError as e:
            raise CacheFull(f"cannot create the shard cache folder {self.dir} ({e.strerror}); "
                            f"set data.cache_dir to a writable folder") from None
        source = self.dir / "SOURCE"
        if not source.exists():
            source.write_text(redact_url(self.url) + "\n")
        self.limit = self.options.limit_bytes
        self.patience = Patience(self.url, self.options.store, self.dir)
        self.stats = {"hits": 0, "downloads": 0, "bytes": 0, "retries": 0, "evictions": 0}
        self._listing: dict[str, int] | None = None
        self._mutex = threading.Lock()

    def __getstate__(self):  # DataLoader workers: fresh counters and lock, same cache folder
        state = dict(self.__dict__)
        state["_mutex"] = None
        state["_fs"], state["_pid"] = None, -1  # the receiving process makes its own client
        state["stats"] = {k: 0 for k in self.stats}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._mutex = threading.Lock()

    @property
    def fs(self):
        """The filesystem client of this process: fsspec's async clients refuse to be used after a
        fork (DataLoader workers), so a forked process makes its own."""
        if self._pid != os.getpid():
            self._fs = filesystem(self.url, self.options.timeout_s)[0]
            self._pid = os.getpid()
        return self._fs

    def remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    # ------------------------------------------------------------------ remote metadata
    def call(self, what: str, fn, *, wait_for_missing: bool = False):
        """``fn()`` with an unreachable store waited out (``Patience``) -> its result."""
        return self.patience.call(fn, what, wait_for_missing=wait_for_missing,
                                  on_retry=lambda: self._count("retries"))

    def listing(self) -> dict[str, int]:
        """Name -> size of every file in the folder (one listing, remembered)."""
        if self._listing is None:
            # a file the listing just named is there: "not found" for it is an outage (fsspec's
            # http client also reports a timed-out HEAD that way)
            self._listing = list_files(
                self.fs, self.root,
                lambda what, fn: self.call(what, fn, wait_for_missing=what != "listing"))
        return self._listing

    def read_text(self, name: str) -> str:
        """A small file (the manifest), always read from the remote; a copy is kept in the cache
        folder (which is then itself a readable shard folder)."""
        def cat():
            return read_capped(self.fs, self.remote(name), SMALL_FILE_MAX,
                               f"{redact_url(self.url)}/{name}")
        text = self.call(name, cat).decode("utf-8")
        from .fsutil import atomic_write_text
        try:
            atomic_write_text(self.dir / name, text)
        except OSError:
            pass  # the copy is a convenience
        return text

    # ------------------------------------------------------------------ the cache
    def _count(self, key: str, n: int = 1) -> None:
        with self._mutex:
            self.stats[key] += n

    @contextmanager
    def _lock(self, name: str):
        """A node-wide lock (every process and thread opens its own descriptor, so ``flock``
        excludes threads of one process too)."""
        with open(self.dir / ".locks" / f"{name}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _marker(self, name: str) -> Path:
        return self.dir / f".{name}.sha256"

    def mark_verified(self, name: str, sha256: str) -> None:
        """``maskdm shard --verify`` checked the cached copy: training need not hash it again."""
        self._marker(name).write_text(sha256 + "\n")

    def cached(self, name: str, size: int, sha256: str | None = None) -> Path | None:
        """The cached copy of ``name`` if it is complete and verified, else None."""
        path = self.dir / name
        try:
            if path.stat().st_size != size:
                return None
        except FileNotFoundError:
            return None
        if sha256 is not None:
            try:
                if self._marker(name).read_text().strip() != sha256:
                    return None
            except FileNotFoundError:
                return None
        return path

    def fetch(self, name: str, size: int, sha256: str | None = None, *, fresh: bool = False,
              keep: set[str] | frozenset[str] = frozenset(),
              wait_for_missing: bool = True) -> Path:
        """The path of a verified local copy of ``name`` (``size`` bytes, and ``sha256`` if given),
        downloaded first if needed (always with ``fresh``: ``--verify`` checks the store, not an
        older copy). A shard (``.tar``) is downloaded in the node's one download slot after making
        room (least recently used first, never ``name`` or ``keep``). An object missing from the
        store is waited for like an outage unless ``wait_for_missing`` is False (then
        FileNotFoundError). Raises RemoteDamaged, RemoteUnreachable, RemoteError or CacheFull."""
        found = None if fresh else self.cached(name, size, sha256)
        if found is not None:
            self._count("hits")
            _touch(found)  # eviction goes least recently used first
            return found
        shard = name.endswith(".tar")
        with self._lock(SLOT if shard else name):
            found = None if fresh else self.cached(name, size, sha256)
            if found is not None:  # another process got it meanwhile
                self._count("hits")
                return found
            if shard:
                self._make_room(size, set(keep) | {name})
            part = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.part"
            try:
                self.call(name, lambda: self._download(name, size, part),
                          wait_for_missing=wait_for_missing)
                if sha256 is not None:
                    digest = sha256_file(part)
                    if digest != sha256:
                        raise RemoteDamaged(
                            f"{name}: sha256 {digest[:12]}... differs from the manifest's "
                            f"{sha256[:12]}... (changed or damaged in the bucket {self.url}; "
                            f"re-shard it, or check it with `maskdm shard --verify {self.url}`)")
                self._marker(name).unlink(missing_ok=True)  # the old copy's, if any
                os.replace(part, self.dir / name)
            finally:
                part.unlink(missing_ok=True)
            if sha256 is not None:
                self._marker(name).write_text(sha256 + "\n")
            self._count("downloads")
            self._count("bytes", size)
        return self.dir / name

    def _download(self, name: str, size: int, part: Path) -> None:
        """One attempt: the object into ``part``. A short copy is an interrupted transfer unless
        the store itself holds another size (then the object is damaged)."""
        try:  # never more than the manifest's size (a store streaming without end)
            self.fs.get_file(self.remote(name), str(part),
                             callback=size_cap(size, f"{redact_url(self.url)}/{name}"))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise CacheFull(
                    f"no space left on the disk of the shard cache {self.dir} while downloading "
                    f"{name} ({size / 2 ** 20:.0f} MiB; data.cache_limit_gb="
                    f"{self.options.limit_gb or 'unlimited'}): free space, lower "
                    f"data.cache_limit_gb or set data.cache_dir to a larger disk") from None
            raise
        got = part.stat().st_size
        if got != size:
            part.unlink(missing_ok=True)
            stored = self.fs.info(self.remote(name)).get("size")
            if stored is not None and int(stored) != size:
                raise RemoteDamaged(f"{name}: {stored} bytes in the bucket {self.url}, the "
                                    f"manifest says {size} (re-shard it, or check it with "
                                    f"`maskdm shard --verify {self.url}`)")
            raise ConnectionError(f"{name}: the transfer ended after {got} of {size} bytes")

    def cached_bytes(self, parts: bool = False) -> dict[str, int]:
        """Name -> size of the complete shards in the cache (and of the downloads in progress,
        with ``parts``)."""
        out = {}
        for p in self.dir.glob(".*.tar.*.part" if parts else "*.tar"):
            try:
                out[p.name] = p.stat().st_size
            except FileNotFoundError:
                pass
        if parts:
            out.update(self.cached_bytes())
        return out

    def evict(self, keep: set[str], need: int = 0) -> None:
        """Make room for ``need`` more bytes, keeping ``keep`` (in the download slot)."""
        if self.limit is None:
            return
        with self._lock(SLOT):
            self._make_room(need, keep)

    def _make_room(self, need: int, keep: set[str]) -> None:
        """Delete cached shards not in ``keep``, least recently used first, until the cache
        holds at most ``limit - need`` bytes. Raises CacheFull if ``keep`` alone is over it.
        Called in the download slot."""
        if self.limit is None:
            return
        files = self.cached_bytes()
        total = sum(files.values())
        if total + need <= self.limit:
            return
        victims = sorted((n for n in files if n not in keep),
                         key=lambda n: _mtime(self.dir / n))
        for n in victims:
            if total + need <= self.limit:
                break
            (self.dir / n).unlink(missing_ok=True)
            self._marker(n).unlink(missing_ok=True)
            total -= files[n]
            self._count("evictions")
        if total + need > self.limit:
            raise CacheFull(f"data.cache_limit_gb={self.options.limit_gb} is smaller than the "
                            f"shards training needs at once ({len(keep)} shards, "
                            f"{(total + need) / 2 ** 30:.2f} GiB in {self.dir}): raise the limit "
                            f"or lower data.shuffle_window / data.cache_lookahead")


SLOT = ".download-slot"  # the node's one shard download at a time (see the module)


def list_files(fs, root: str, call) -> dict[str, int]:
    """Name -> size of the files directly in ``root`` ({} if it does not exist); ``call(what,
    fn)`` runs each request (``RemoteShards.call``, or the upload's own)."""
    def ls():
        try:
            return fs.ls(root, detail=True, refresh=True)
        except FileNotFoundError:
            return []
    files = {Path(e["name"]).name: e.get("size") for e in call("listing", ls)
             if e.get("type", "file") == "file"}
    unknown = [n for n, size in files.items() if size is None]
    if unknown:  # an http(s):// index page lists names only: ask each file (HEAD)
        from concurrent.futures import ThreadPoolExecutor

        def size_of(name):
            return call(name, lambda: fs.info(f"{root.rstrip('/')}/{name}"))["size"]
        with ThreadPoolExecutor(16) as pool:
            files.update(zip(unknown, pool.map(size_of, unknown)))
    return {n: int(size or 0) for n, size in files.items()}


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
