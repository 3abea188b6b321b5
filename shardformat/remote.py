"""Shard folders in object storage (s3://, gs://, http(s)://), read through a bounded local cache.

A remote folder holds exactly what a local one does (``manifest.json``, ``shard-NNNNNN.tar`` and
``.idx``). Nothing reads remote bytes directly: ``RemoteShards.fetch(name)`` returns the path of a
verified copy in the node's cache folder, downloading it first if it is not there. A download goes
to a hidden ``.part`` file, is checked against the manifest (size, and sha256 for shards) and only
then renamed to its name, so a reader never sees a partial or wrong file. Every process of a node
(ranks, DataLoader workers) shares one cache folder: a per-file lock (``fcntl.flock``) makes one of
them download while the others wait and then find the file. Transient errors are retried with
exponential backoff and counted; a file that stays unreachable raises ``RemoteError`` (the reader
treats its shard as damaged). Eviction is explicit (``evict(keep)``, called by the loader's
prefetcher, which knows the shards it needs next); a file evicted while a reader holds it open
stays readable through that descriptor.

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
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .fsutil import sha256_file

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
    ``data.cache_limit_gb``; 0: no limit)."""

    dir: str | None = None
    limit_gb: float = 0.0
    retries: int = 5  # attempts after the first, with backoff 0.5 s, 1 s, 2 s, ...
    backoff: float = 0.5

    @property
    def limit_bytes(self) -> int | None:
        return int(self.limit_gb * 2 ** 30) if self.limit_gb > 0 else None


class RemoteError(RuntimeError):
    """A remote file could not be had (unreachable after the retries, or not what the manifest
    says)."""


class CacheFull(RuntimeError):
    """The cache's disk is full: the message names the folder and the limit."""


def filesystem(url: str):
    """-> (fsspec filesystem, path inside it) for ``url``, or ValueError saying what to install."""
    scheme = url_scheme(url)
    if scheme not in SCHEMES:
        raise ValueError(f"{url}: {scheme}:// locations are not supported; use a local or shared "
                         f"filesystem path, or an {', '.join(s + '://' for s in SCHEMES)} URL")
    try:
        import fsspec
        kwargs = {"skip_instance_cache": True}  # each folder its own client (endpoint, env)
        if scheme == "s3":  # one attempt per call: the retries and their backoff are ours
            kwargs["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 10,
                                       "read_timeout": 120}
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
        if hasattr(fs, "retries"):
            fs.retries = 1
        return fs, path
    except ImportError as e:
        package, extra = SCHEMES[scheme]
        raise ValueError(f"{url}: reading {scheme}:// needs the {package} package ({e}); "
                         f"pip install 'maskdm[{extra}]'") from None


class RemoteShards:
    """One remote shard folder and its cache folder on this node."""

    def __init__(self, url: str, cache: CacheOptions | None = None):
        self.url = str(url).rstrip("/")
        self.options = cache or CacheOptions()
        self._fs, self.root = filesystem(self.url)
        self._pid = os.getpid()
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        base = Path(self.options.dir) if self.options.dir else default_cache_dir()
        self.dir = base / f"{Path(self.root).name or 'root'}-{key}"
        try:
            (self.dir / ".locks").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheFull(f"cannot create the shard cache folder {self.dir} ({e.strerror}); "
                            f"set data.cache_dir to a writable folder") from None
        source = self.dir / "SOURCE"
        if not source.exists():
            source.write_text(self.url + "\n")
        self.limit = self.options.limit_bytes
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
            self._fs = filesystem(self.url)[0]
            self._pid = os.getpid()
        return self._fs

    def remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    # ------------------------------------------------------------------ remote metadata
    def _retry(self, what: str, fn):
        """``fn()`` with retries and backoff on transient errors -> its result, or RemoteError."""
        return with_retries(fn, what, self.url, self.options,
                            on_retry=lambda: self._count("retries"))

    def listing(self) -> dict[str, int]:
        """Name -> size of every file in the folder (one listing, remembered)."""
        if self._listing is None:
            self._listing = list_files(self.fs, self.root, self._retry)
        return self._listing

    def read_text(self, name: str) -> str:
        """A small file (the manifest), always read from the remote; a copy is kept in the cache
        folder (which is then itself a readable shard folder)."""
        def cat():
            return self.fs.cat_file(self.remote(name))
        text = self._retry(name, cat).decode("utf-8")
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
        with open(self.dir / ".locks" / f"{name}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _marker(self, name: str) -> Path:
        return self.dir / f".{name}.sha256"

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

    def fetch(self, name: str, size: int, sha256: str | None = None, *,
              fresh: bool = False) -> Path:
        """The path of a verified local copy of ``name`` (``size`` bytes, and ``sha256`` if given),
        downloaded first if needed (always with ``fresh``: ``--verify`` checks the store, not an
        older copy). Raises RemoteError or CacheFull."""
        found = None if fresh else self.cached(name, size, sha256)
        if found is not None:
            self._count("hits")
            _touch(found)  # eviction goes least recently used first
            return found
        with self._lock(name):
            # another process got it meanwhile
            found = None if fresh else self.cached(name, size, sha256)
            if found is not None:
                self._count("hits")
                return found
            part = self.dir / f".{name}.{os.getpid()}.part"

            def get():
                try:
                    self.fs.get_file(self.remote(name), str(part))
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        part.unlink(missing_ok=True)
                        raise CacheFull(
                            f"no space left on the disk of the shard cache {self.dir} while "
                            f"downloading {name} ({size / 2 ** 20:.0f} MiB; data.cache_limit_gb="
                            f"{self.options.limit_gb or 'unlimited'}): free space, lower "
                            f"data.cache_limit_gb or set data.cache_dir to a larger disk") from None
                    raise
                got = part.stat().st_size
                if got != size:
                    part.unlink(missing_ok=True)
                    raise OSError(f"{name}: got {got} bytes, the manifest says {size}")
            try:
                self._retry(name, get)
            except FileNotFoundError:
                part.unlink(missing_ok=True)
                raise RemoteError(f"{name} does not exist in {self.url}") from None
            finally:
                if part.exists() and part.stat().st_size != size:
                    part.unlink(missing_ok=True)
            if sha256 is not None:
                digest = sha256_file(part)
                if digest != sha256:
                    part.unlink(missing_ok=True)
                    raise RemoteError(f"{name}: sha256 {digest[:12]}... differs from the "
                                      f"manifest's {sha256[:12]}... (changed or damaged in "
                                      f"{self.url}; re-shard it, or check it with `maskdm shard "
                                      f"--verify {self.url}`)")
            self._marker(name).unlink(missing_ok=True)  # the old copy's, if any
            os.replace(part, self.dir / name)
            if sha256 is not None:
                self._marker(name).write_text(sha256 + "\n")
            self._count("downloads")
            self._count("bytes", size)
        return self.dir / name

    def cached_bytes(self) -> dict[str, int]:
        """Name -> size of the complete shards in the cache."""
        out = {}
        for p in self.dir.glob("*.tar"):
            try:
                out[p.name] = p.stat().st_size
            except FileNotFoundError:
                pass
        return out

    def evict(self, keep: set[str], need: int = 0) -> None:
        """Delete cached shards not in ``keep``, least recently used first, until the cache
        holds at most ``limit - need`` bytes. Raises CacheFull if ``keep`` alone is over it."""
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
            with self._lock(n):
                (self.dir / n).unlink(missing_ok=True)
                self._marker(n).unlink(missing_ok=True)
            total -= files[n]
            self._count("evictions")
        if total + need > self.limit:
            raise CacheFull(f"data.cache_limit_gb={self.options.limit_gb} is smaller than the "
                            f"shards training needs at once ({len(keep)} shards, "
                            f"{(total + need) / 2 ** 30:.2f} GiB in {self.dir}): raise the limit "
                            f"or lower data.cache_lookahead")


def list_files(fs, root: str, retry) -> dict[str, int]:
    """Name -> size of the files directly in ``root`` ({} if it does not exist); ``retry(what,
    fn)`` runs each request (``RemoteShards._retry``, or the upload's own)."""
    def ls():
        try:
            return fs.ls(root, detail=True, refresh=True)
        except FileNotFoundError:
            return []
    files = {Path(e["name"]).name: e.get("size") for e in retry("listing", ls)
             if e.get("type", "file") == "file"}
    unknown = [n for n, size in files.items() if size is None]
    if unknown:  # an http(s):// index page lists names only: ask each file (HEAD)
        from concurrent.futures import ThreadPoolExecutor

        def size_of(name):
            return retry(name, lambda: fs.info(f"{root.rstrip('/')}/{name}"))["size"]
        with ThreadPoolExecutor(16) as pool:
            files.update(zip(unknown, pool.map(size_of, unknown)))
    return {n: int(size or 0) for n, size in files.items()}


def with_retries(fn, what: str, url: str, options: CacheOptions, on_retry=None):
    """``fn()``, retried ``options.retries`` times with exponential backoff on transient errors
    (network, server); a missing object (FileNotFoundError), a full disk and our own errors are
    not retried. -> fn's result, or RemoteError naming ``what`` and ``url``."""
    last = None
    for attempt in range(options.retries + 1):
        try:
            return fn()
        except (FileNotFoundError, CacheFull, RemoteError):
            raise
        except PermissionError as e:  # access denied: no retry helps
            raise RemoteError(f"{what or url}: access to {url} denied ({e}); check the "
                              f"credentials this machine uses for {url_scheme(url)}://") from None
        except Exception as e:
            if "Credentials" in type(e).__name__ or "credentials" in str(e).lower()[:200]:
                raise RemoteError(
                    f"{what or url}: no usable credentials for {url} ({type(e).__name__}: {e}); "
                    f"set them the store's usual way (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                    f" or ~/.aws for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://)") from None
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise
            last = e
        if attempt < options.retries:
            if on_retry is not None:
                on_retry()
            time.sleep(options.backoff * 2 ** attempt)
    raise RemoteError(f"{what or url}: unreachable in {url} after {options.retries + 1} attempts "
                      f"({type(last).__name__}: {last})")


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
