"""Random-access reads of samples from a shard directory, with damage detection.

Samples are read by offset (from the DALI index) with ``os.pread``, so each rank and worker reads
only its own samples. When the reader opens it checks every shard cheaply (tar and index present,
tar size as in the manifest, index header, line count and last entry within the tar): a shard that
fails is left out of the order (``excluded``, with one line saying why). Every rank sees the same
files, so all agree on the order. Problems found per sample (an index line that does not parse, an
entry without the required components or with a wrong-sized tensor, a short read) raise
``SampleError``; the loaders decide whether to replace the sample or stop (``strict``). Shard
arguments below are positions in ``used`` (the shards in the order), not manifest positions.
"""

from __future__ import annotations

import os
from pathlib import Path

from .fsutil import url_refusal
from .haar import dwt16_nbytes
from .manifest import DatasetError, ShardManifest, load_manifest
from .remote import CacheOptions, RemoteDamaged, RemoteShards, is_remote
from .tarfmt import BadIndex, Component, check_index, read_index, sample_key


class SampleError(RuntimeError):
    """One sample cannot be used; the message names the shard, the key and why."""


class ShardReader:
    MAX_OPEN_REMOTE = 4  # open descriptors per process on cached shards (evicted ones free space)

    def __init__(self, directory: str | os.PathLike, manifest: ShardManifest | None = None,
                 cache: CacheOptions | None = None):
        """``directory``: a local shard folder or an object-storage URL (s3://, gs://,
        http(s)://), read through the node's cache (``cache``, see ``shardformat.remote``)."""
        self.remote: RemoteShards | None = None
        if is_remote(directory):
            try:
                self.remote = RemoteShards(str(directory), cache)
            except ValueError as e:
                raise DatasetError(str(e)) from None
            self.location = self.remote.url
            self.directory = self.remote.dir
            self.manifest = manifest or load_manifest(self.location, remote=self.remote)
            self._fetch_indexes()
        else:
            if (refused := url_refusal(directory, "shard folder")) is not None:
                raise DatasetError(refused)
            self.directory = Path(directory).resolve()
            self.location = str(self.directory)
            self.manifest = manifest or load_manifest(self.directory)
        m = self.manifest
        self.encoding = m.encoding
        self.image_size = m.image_size
        self.required = ("dwt16", "json") if m.encoding == "dwt16" else ("jpg", "json")
        self.dwt_bytes = dwt16_nbytes(m.image_size)
        self.excluded: dict[str, str] = {}  # shard name -> why it is left out
        self.used: list[int] = []
        for i, s in enumerate(m.shards):
            why = self._shard_problem(s)
            if why is None:
                self.used.append(i)
            else:
                self.excluded[s.name] = why
        if not self.used:
            raise SampleError(f"{self.location}: no usable shard ({next(iter(self.excluded.values()))}"
                              f"); run `maskdm shard --verify {self.location}`")
        self.order_sizes = [m.shards[i].samples for i in self.used]
        self.shard_problems: dict[int, str] = {}
        self._index: dict[int, list[list[Component]]] = {}
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _fetch_indexes(self) -> None:
        """Remote: every shard's index into the cache (small; needed to read any sample), many at
        a time. A shard whose index cannot be had is left out (``_shard_problem``)."""
        from concurrent.futures import ThreadPoolExecutor
        listing = self.remote.listing()
        self._index_problems: dict[str, str] = {}

        def get(s):  # an unreachable store is waited out and then raised, never a left-out shard
            if s.index not in listing:
                return
            try:
                self.remote.fetch(s.index, listing[s.index])
            except RemoteDamaged as e:
                self._index_problems[s.index] = str(e)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(get, self.manifest.shards))

    def _shard_problem(self, s) -> str | None:
        if self.remote is not None:  # sizes from the store's listing; the index is cached
            listing = self.remote.listing()
            if s.name not in listing:
                return f"{s.name} is missing in {self.location}"
            if listing[s.name] != s.bytes:
                return (f"{s.name} has {listing[s.name]} bytes in {self.location}, the manifest "
                        f"{s.bytes}")
            if s.index not in listing:
                return f"{s.index} is missing in {self.location}"
            if s.index in self._index_problems:
                return self._index_problems[s.index]
            try:
                check_index(self.directory / s.index, s.samples, s.bytes)
            except BadIndex as e:
                return str(e)
            return None
        tar, idx = self.directory / s.name, self.directory / s.index
        try:
            size = os.stat(tar).st_size
        except FileNotFoundError:
            return f"{s.name} is missing"
        except OSError as e:
            return f"{s.name} is unreadable ({e.strerror or e})"
        if size != s.bytes:
            return (f"{s.name} has {size} bytes, the manifest {s.bytes} "
                    f"({'truncated' if size < s.bytes else 'overwritten'})")
        if not idx.exists():
            return f"{s.index} is missing"
        try:
            check_index(idx, s.samples, size)
        except BadIndex as e:
            return str(e)
        return None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"], state["_fds"], state["_sizes"] = {}, {}, {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def num_samples(self) -> int:
        """Samples in the order (the manifest's count minus excluded shards)."""
        return sum(self.order_sizes)

    def shard_entry(self, shard: int):
        return self.manifest.shards[self.used[shard]]

    def tar_path(self, shard: int) -> Path:
        """The shard's tar on this machine (remote: its verified copy in the cache, downloaded
        first if needed, waiting out an unreachable store; a shard whose bytes in the store are
        not the manifest's raises SampleError, like a damaged one; a store unreachable for longer
        than the patience raises RemoteUnreachable, which stops training)."""
        entry = self.shard_entry(shard)
        if self.remote is None:
            return self.directory / entry.name
        if shard in self.shard_problems:
            raise SampleError(self.shard_problems[shard])
        try:
            return self.remote.fetch(entry.name, entry.bytes, entry.sha256)
        except RemoteDamaged as e:
            self.shard_problems[shard] = str(e)
            raise SampleError(str(e)) from None

    def index(self, shard: int) -> list[list[Component]]:
        if shard not in self._index:
            if shard in self.shard_problems:
                raise SampleError(self.shard_problems[shard])
            entry = self.shard_entry(shard)
            try:
                parsed = read_index(self.directory / entry.index)
            except BadIndex as e:
                self.shard_problems[shard] = str(e)
                raise SampleError(self.shard_problems[shard]) from None
            if len(parsed) != entry.samples:
                self.shard_problems[shard] = (f"{entry.index} lists {len(parsed)} samples, the "
                                              f"manifest {entry.samples}")
                raise SampleError(self.shard_problems[shard])
            self._index[shard] = parsed
        return self._index[shard]

    def entries(self, shard: int, j: int) -> tuple[str, dict[str, Component]]:
        """(key, ext -> Component) for sample ``j`` of ``shard``, checked against the contract."""
        entry = self.index(shard)[j]
        key = sample_key(entry)
        comps = {c.ext: c for c in entry}
        name = self.shard_entry(shard).name
        for ext in self.required:
            if ext not in comps:
                raise SampleError(f"{name}/{key}: missing component '{ext}'")
        if "dwt16" in self.required and comps["dwt16"].size != self.dwt_bytes:
            raise SampleError(f"{name}/{key}: dwt16 has {comps['dwt16'].size} bytes, expected "
                              f"{self.dwt_bytes}")
        size = self._tar_size(shard)
        end = max(comps[e].offset + comps[e].size for e in self.required)
        if end > size:
            raise SampleError(f"{name}/{key}: truncated tar ({size} bytes, sample ends at {end})")
        return key, comps

    def _tar_size(self, shard: int) -> int:
        if shard not in self._sizes:
            if self.remote is not None:  # a cached copy exists only with the manifest's size
                self.tar_path(shard)
                self._sizes[shard] = self.shard_entry(shard).bytes
            else:
                self._sizes[shard] = os.stat(self.tar_path(shard)).st_size
        return self._sizes[shard]

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            if self.remote is not None and len(self._fds) >= self.MAX_OPEN_REMOTE:
                oldest = next(iter(self._fds))  # let the cache's eviction free its space
                os.close(self._fds.pop(oldest))
            for attempt in range(3):
                try:
                    self._fds[shard] = os.open(self.tar_path(shard), os.O_RDONLY)
                    break
                except FileNotFoundError:  # evicted by another process between check and open
                    if self.remote is None or attempt == 2:
                        raise
        return self._fds[shard]

    def read_dwt_into(self, shard: int, j: int, dst) -> tuple[str, bytes]:
        """Read sample ``j`` of usable shard ``shard``: its dwt16 tensor straight into ``dst`` (a
        writable buffer of the right size, e.g. a row of a shared-memory batch); -> (key, json)."""
        key, comps = self.entries(shard, j)
        fd = self._fd(shard)
        c = comps["dwt16"]
        got = os.preadv(fd, [memoryview(dst).cast("B")], c.offset)
        meta = os.pread(fd, comps["json"].size, comps["json"].offset)
        if got != c.size or len(meta) != comps["json"].size:
            raise SampleError(f"{self.shard_entry(shard).name}/{key}: short read")
        return key, meta

    def read_at(self, shard: int, j: int) -> tuple[str, dict[str, bytes]]:
        """Sample ``j`` of usable shard ``shard`` (storage order) -> (key, ext -> bytes)."""
        key, comps = self.entries(shard, j)
        fd = self._fd(shard)
        out = {}
        for ext in self.required:
            c = comps[ext]
            data = os.pread(fd, c.size, c.offset)
            if len(data) != c.size:
                raise SampleError(f"{self.shard_entry(shard).name}/{key}: short read of "
                                  f"{ext} ({len(data)} of {c.size} bytes)")
            out[ext] = data
        return key, out
