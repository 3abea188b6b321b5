"""Run folders in object storage (``train.run_dir: s3://bucket/runs/x``, or ``gs://``).

No shared filesystem is needed: every node works in a local copy of the run folder under its
scratch folder (``train.scratch_dir``; one copy per node, ``node<first rank>/run``), and the bucket
holds what a resume needs.

Writing a checkpoint: every rank writes its part into its node's local copy as for a local run
(``checkpoint.save``, committed per node), then uploads the files it wrote (``owner``) in a
background thread while training continues, and puts a marker ``.uploaded-rankNNNNN.json``
listing them. Rank 0, once every rank's marker is there, writes ``COMMITTED.json`` last: a
checkpoint in the bucket is complete only with it, so a job killed mid-upload never resumes from
a half-uploaded one. Then ``keep_last`` is applied in the bucket (older checkpoints and leftovers
of killed uploads are deleted). A new checkpoint waits for the previous upload to finish (and
says so) rather than piling up copies.

Resuming (``--resume auto``): the newest committed checkpoint is found in the bucket and each rank
downloads what it needs into its node's copy (the common files once per node, under a file lock;
everything when the world size changed and the partitions must be converted); local checkpoints
the bucket never committed are dropped first. ``fetch_weights`` gives a checkpoint's EMA weights
and meta (``train.init_from``, ``maskdm export/sample`` of a bucket run).

An unreachable bucket is waited out (``patience.Patience``: ``data.remote_patience_s``), never
skipped; past the patience the error stops the run after its last committed checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from maskdm.shardformat.fsutil import (
    NotPrivate,
    atomic_write_bytes,
    plain_name_problem,
    private_folder,
    redact_url,
)
from maskdm.shardformat.patience import CacheFull, Patience, RemoteError, StoreOptions
from maskdm.shardformat.remote import (
    SMALL_FILE_MAX,
    default_cache_dir,
    filesystem,
    is_remote,
    read_capped,
    size_cap,
    url_scheme,
)

COMMIT = "COMMITTED.json"
MARK = ".uploaded-rank{:05d}.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
RUN_FILES = ("mlflow.json", "metrics.jsonl", "config.yaml", "deepspeed_config.json")
_RANKED = (re.compile(r"^zero_pp_rank_(\d+)_"), re.compile(r"_rank(\d{5})\.pt$"))
COMMON = ("meta.json", "mp_rank_00_model_states.pt", "ema_rank00000.pt")


def owner(name: str) -> int:
    """The rank that writes (and uploads) a checkpoint file: the rank in its name (DeepSpeed's
    ``zero_pp_rank_R_...``, our ``..._rankRRRRR.pt``), else rank 0."""
    for pattern in _RANKED:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return 0


def check_url(url: str, what: str) -> None:
    if url_scheme(url) in ("http", "https"):
        raise ValueError(f"{what}: {url}: http(s):// is read-only; a run folder needs a bucket "
                         f"(s3:// or gs://)")


class Bucket:
    """One folder in a bucket with every request waited out through ``Patience``."""

    def __init__(self, url: str, store: StoreOptions, state_dir: Path | None, what: str):
        self.url = url.rstrip("/")
        self.fs, root = filesystem(self.url, store.timeout_s)
        self.root = root.rstrip("/")
        self.patience = Patience(self.url, store, state_dir, what_pauses=what)

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def where(self, *parts: str) -> str:
        """The object's URL as messages show it (credentials redacted)."""
        return "/".join([redact_url(self.url), *parts])

    def call(self, what: str, fn):
        return self.patience.call(fn, what)

    def ls(self, *parts: str) -> dict[str, dict]:
        """Name -> entry of what is directly under ``parts`` ({} if nothing)."""
        def ls():
            try:
                return self.fs.ls(self.key(*parts), detail=True, refresh=True)
            except FileNotFoundError:
                return []
        return {Path(e["name"]).name: e for e in self.call("/".join(parts) or "listing", ls)}

    def read_json(self, *parts: str) -> dict | None:
        """A small JSON record (at most ``SMALL_FILE_MAX`` bytes read), or None if absent."""
        where = self.where(*parts)
        try:
            data = self.call(parts[-1], lambda: read_capped(self.fs, self.key(*parts),
                                                            SMALL_FILE_MAX, where))
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise RemoteError(f"{where} is not JSON: written by something else or damaged; "
                              f"check the folder") from None

    def put_bytes(self, data: bytes, *parts: str) -> None:
        self.call(parts[-1], lambda: self.fs.pipe_file(self.key(*parts), data))

    def put(self, path: Path, *parts: str) -> None:
        self.call(parts[-1], lambda: self.fs.put_file(str(path), self.key(*parts)))

    def get(self, local: Path, size: int, *parts: str) -> None:
        """Download to ``local`` through a hidden part file (never a partial file by name), never
        more than ``size`` bytes (what the commit record or the listing says it holds)."""
        part = local.with_name(f".{local.name}.{os.getpid()}.part")
        local.parent.mkdir(parents=True, exist_ok=True)
        where = self.where(*parts)
        try:  # a fresh count per attempt
            self.call(parts[-1], lambda: self.fs.get_file(self.key(*parts), str(part),
                                                          callback=size_cap(size, where)))
            os.replace(part, local)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise CacheFull(f"no space left on the disk of {local.parent} while downloading "
                            f"{where} ({size / 2 ** 20:.0f} MiB): free space there, or point "
                            f"train.scratch_dir (MASKDM_CACHE for export/sample/init_from) at "
                            f"a larger disk") from None
        finally:
            part.unlink(missing_ok=True)

    def rm_tree(self, *parts: str) -> None:
        def rm():
            try:
                self.fs.rm(self.key(*parts), recursive=True)
            except FileNotFoundError:
                pass
        self.call("/".join(parts), rm)


def commit_files(bucket: Bucket, name: str) -> tuple[dict, dict[str, int]]:
    """Checkpoint ``name``'s commit record and its files (name -> size), every name checked to be
    a plain file name: the record comes from the bucket, and its names are joined to local
    folders."""
    record = bucket.read_json("checkpoints", name, COMMIT)
    where = bucket.where("checkpoints", name, COMMIT)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise RemoteError(f"{where} is not a commit record (no files): written by something "
                          f"else or tampered with")
    for f, size in files.items():
        why = plain_name_problem(f)
        if why is None and not (isinstance(size, int) and size >= 0):
            why = f"has no valid size ({size!r})"
        if why is not None:
            raise RemoteError(f"{where}: file name {f!r} {why}; refusing to write outside the "
                              f"run's copy (the record was written by something else or "
                              f"tampered with)")
    return record, files


def committed(bucket: Bucket) -> list[str]:
    """The checkpoints (``step_*`` names) of a run folder in a bucket that are complete, oldest
    first."""
    names = sorted(n for n in bucket.ls("checkpoints") if STEP_DIR.match(n))
    return [n for n in names if COMMIT in bucket.ls("checkpoints", n)]


@contextmanager
def _flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunStore:
    """Where a run folder lives: a local folder (shared by the nodes, as before), or a bucket with
    a local copy on each node."""

    def __init__(self, run_dir: str, scratch: Path | None, store: StoreOptions | None = None, *,
                 rank: int = 0, local_rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.url = str(run_dir).rstrip("/") if is_remote(run_dir) else None
        self.bucket = None
        self.lease = None  # rank 0's lease on a folder in a bucket (hold())
        if self.url is None:
            self.local = Path(run_dir)
            return
        check_url(self.url, "train.run_dir")
        self.local = scratch / f"node{rank - local_rank}" / "run"
        self.local.mkdir(parents=True, exist_ok=True)
        self.bucket = Bucket(self.url, store or StoreOptions(), scratch, "training")
        self.stats = {"upload_s": 0.0, "upload_bytes": 0, "uploads": 0, "wait_s": 0.0}
        self._thread: threading.Thread | None = None
        self._uploading: str | None = None
        self.error: BaseException | None = None

    def hold(self, what: str, ttl_s: float, log) -> None:
        """Rank 0: take the folder's lease (one job writes a run folder in a bucket) or raise
        LeaseHeld naming the job that holds it; checked before every commit."""
        from maskdm.shardformat.lease import NAME, bucket_lease
        self.lease = bucket_lease(self.bucket.fs, self.bucket.key(NAME), self.bucket.where(), what,
                                  self.bucket.call, ttl_s=ttl_s)
        self.lease.acquire(log)

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    @property
    def remote(self) -> bool:
        return self.url is not None

    @property
    def where(self) -> str:
        return self.url or str(self.local)

    # ------------------------------------------------------------------ resume
    def newest(self) -> str | None:
        found = committed(self.bucket)
        return found[-1] if found else None

    def fetch_checkpoint(self, name: str, *, world: int, only: tuple[str, ...] = ()) -> Path:
        """What this rank needs of checkpoint ``name`` -> its folder in the node's copy (no
        collective: the files ranks share are downloaded once per node under a file lock; all of
        them when it was written by another number of ranks than ``world``, for the conversion).
        Local checkpoints the bucket never committed are dropped."""
        root = self.local / "checkpoints"
        with _flock(self.local / ".locks" / "checkpoints.lock"):
            keep = set(committed(self.bucket))
            if root.is_dir():
                for p in root.iterdir():
                    if STEP_DIR.match(p.name) and p.name not in keep:
                        shutil.rmtree(p, ignore_errors=True)
        record, files = commit_files(self.bucket, name)
        everything = int(record.get("world_size", world)) != world
        want = [f for f in files if everything or f in COMMON or owner(f) == self.rank]
        if only:
            want = [f for f in want if f in only]
        dest = root / name
        for f in sorted(want, key=lambda f: f != "meta.json"):
            local = dest / f
            with _flock(self.local / ".locks" / f"{name}-{f}.lock"):
                if local.exists() and local.stat().st_size == files[f]:
                    continue
                self.bucket.get(local, files[f], "checkpoints", name, f)
                if local.stat().st_size != files[f]:
                    raise RemoteError(f"{self.url}/checkpoints/{name}/{f}: {local.stat().st_size} "
                                      f"bytes downloaded, the commit record says {files[f]}")
        return dest

    def fetch_run_files(self) -> None:
        """Rank 0: the run's records (MLflow run, metrics) into the local copy, so a resumed run
        continues the same MLflow run and metric file."""
        have = self.bucket.ls()
        for name in ("mlflow.json", "metrics.jsonl"):
            if name in have and not (self.local / name).exists():
                self.bucket.get(self.local / name, int(have[name].get("size") or 0), name)

    # ------------------------------------------------------------------ save
    def upload_checkpoint(self, path: Path, keep_last: int, log) -> None:
        """Start uploading this rank's files of the checkpoint at ``path`` (after the previous
        upload has finished)."""
        self.wait(log, before=path.name)
        self._uploading = path.name
        self._thread = threading.Thread(target=self._upload, args=(path, keep_last),
                                        name="maskdm-upload", daemon=True)
        self._thread.start()

    def wait(self, log=None, before: str | None = None) -> None:
        """Block until the upload in progress is done; raise what stopped it."""
        if self._thread is not None and self._thread.is_alive():
            if log is not None:
                log(f"waiting for the upload of {self._uploading} to {self.url} to finish"
                    + (f" before writing {before} (uploading a checkpoint takes longer than "
                       f"train.ckpt_every steps)" if before else ""))
            t0 = time.time()
            self._thread.join()
            self.stats["wait_s"] += time.time() - t0
        self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _upload(self, path: Path, keep_last: int) -> None:
        try:
            t0, name = time.time(), path.name
            mine = {f.name: f.stat().st_size for f in sorted(path.iterdir())
                    if f.is_file() and owner(f.name) == self.rank}
            for f, size in mine.items():
                self.bucket.put(path / f, "checkpoints", name, f)
                self.stats["upload_bytes"] += size
            self.bucket.put_bytes(json.dumps({"rank": self.rank, "files": mine}).encode(),
                                  "checkpoints", name, MARK.format(self.rank))
            if self.rank == 0:
                self._commit(name, keep_last)
            self.stats["upload_s"] += time.time() - t0
            self.stats["uploads"] += 1
        except BaseException as e:  # the trainer raises it at its next wait()
            self.error = e

    def _commit(self, name: str, keep_last: int) -> None:
        marks = [MARK.format(r) for r in range(self.world)]
        while True:  # every rank's files are in the bucket once its marker is
            listing = self.bucket.ls("checkpoints", name)
            if all(m in listing for m in marks):
                break
            time.sleep(0.5)
        files: dict[str, int] = {}
        for m in marks:
            files.update(self.bucket.read_json("checkpoints", name, m)["files"])
        wrong = [f for f, size in files.items() if listing.get(f, {}).get("size") != size]
        if wrong:
            raise RemoteError(f"{self.url}/checkpoints/{name}: {', '.join(wrong[:3])} missing or "
                              f"of another size after the upload")
        if self.lease is not None:  # another job took the folder over: commit nothing
            self.lease.check()
        self.bucket.put_bytes(json.dumps({"step": name, "world_size": self.world, "files": files,
                                          "time": time.time()}, indent=1).encode(),
                              "checkpoints", name, COMMIT)
        for f in RUN_FILES:  # the run's records, as of this checkpoint
            if (self.local / f).exists():
                self.bucket.put(self.local / f, f)
        keep = set(committed(self.bucket)[-keep_last:]) | {name}
        for old in self.bucket.ls("checkpoints"):
            if STEP_DIR.match(old) and old not in keep and old < name:
                self.bucket.rm_tree("checkpoints", old)

    def upload_tree(self, sub: str) -> None:
        """Rank 0, at the end: a folder of the local copy (``export``, ``samples``) and the run's
        records into the bucket."""
        if self.lease is not None:
            self.lease.check()
        folder = self.local / sub
        if folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    self.bucket.put(f, sub, *f.relative_to(folder).parts)
        for f in RUN_FILES:
            if (self.local / f).exists():
                self.bucket.put(self.local / f, f)


def fetch_weights(url: str, store: StoreOptions | None = None) -> Path:
    """A run folder or checkpoint in a bucket -> a local folder holding the newest committed
    checkpoint's ``meta.json`` and EMA weights (cached under the maskdm cache folder): what
    ``checkpoint.load_ema_weights`` reads (``train.init_from``, export, sample)."""
    url = url.rstrip("/")
    check_url(url, "checkpoint")
    cache = default_cache_dir().parent / "checkpoints"
    if STEP_DIR.match(url.rsplit("/", 1)[-1]):
        run, name = url.rsplit("/checkpoints/", 1) if "/checkpoints/" in url else \
            url.rsplit("/", 1)
        bucket = Bucket(run, store or StoreOptions(), None, "reading")
        if COMMIT not in bucket.ls("checkpoints", name):
            raise RemoteError(f"{url} is not a committed checkpoint (no {COMMIT}: an upload "
                              f"that did not finish)")
    else:
        bucket = Bucket(url, store or StoreOptions(), None, "reading")
        found = committed(bucket)
        if not found:
            raise RemoteError(f"no committed checkpoint in {url}/checkpoints")
        name = found[-1]
    record, files = commit_files(bucket, name)
    key = hashlib.sha256(f"{bucket.url}/{name}/{record.get('time')}".encode()).hexdigest()[:12]
    dest = cache / f"{name}-{key}"
    try:  # files of the right size found here are trusted: the folder must be this user's
        private_folder(dest, "MASKDM_CACHE")
    except NotPrivate as e:
        raise RemoteError(f"checkpoint cache: {e}") from None
    for f, size in files.items():
        if f == "meta.json" or f.startswith("ema_rank"):
            local = dest / f
            if not (local.exists() and local.stat().st_size == size):
                bucket.get(local, size, "checkpoints", name, f)
    atomic_write_bytes(dest / "SOURCE", f"{bucket.url}/checkpoints/{name}\n".encode())
    return dest
