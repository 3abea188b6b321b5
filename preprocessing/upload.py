"""``maskdm shard SRC s3://bucket/prefix``: shard into a local staging folder, then upload.

The sharding job itself is the local, resumable one (``shard_job``), run in a staging folder on
this machine (``--stage``; default ``~/.cache/maskdm/staging/NAME-HASH``). The upload then puts the
job record first (so a re-run knows whose partial upload the bucket holds), every shard and index
(skipping objects already there with the same size: a killed job re-run uploads only what is
missing), ``skipped.jsonl``, and the manifest last, after a listing has confirmed every shard is in
place: a folder with a manifest is complete. Objects in S3 and GCS appear whole or not at all, so
a cut upload leaves nothing a reader can see. The staging folder is removed after a complete upload
(``--keep-stage`` keeps it); it needs the space of the whole dataset while the job runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maskdm.shardformat.fsutil import NotPrivate, private_folder, redact_url
from maskdm.shardformat.manifest import MANIFEST, SKIPPED, ShardManifest
from maskdm.shardformat.remote import (
    SMALL_FILE_MAX,
    Patience,
    RemoteError,
    StoreOptions,
    default_cache_dir,
    filesystem,
    list_files,
    read_capped,
    url_scheme,
)

from .shard_job import JOB, ShardJobError, ShardOptions, run

READ_ONLY = ("http", "https")


def default_stage(url: str) -> Path:
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return default_cache_dir().parent / "staging" / f"{name}-{key}"


class _Bucket:
    """The destination folder: listing, small reads, uploads and deletes, with retries."""

    def __init__(self, url: str, store: StoreOptions):
        self.url = url.rstrip("/")
        try:
            self.fs, root = filesystem(self.url, store.timeout_s)
        except ValueError as e:
            raise ShardJobError(str(e)) from None
        self.root = root.rstrip("/")
        self.patience = Patience(self.url, store, what_pauses="the upload")

    @property
    def retries(self) -> int:
        return self.patience.retries

    def _do(self, what: str, fn):
        try:
            return self.patience.call(fn, what)
        except RemoteError as e:
            raise ShardJobError(f"{e}; re-run the same command to go on (finished uploads are "
                                f"kept)") from None

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listing(self) -> dict[str, int]:
        return list_files(self.fs, self.root, self._do)

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self._do(name, lambda: read_capped(
                self.fs, self.key(name), SMALL_FILE_MAX, f"{redact_url(self.url)}/{name}")))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None

    def put(self, path: Path, name: str) -> None:
        self._do(name, lambda: self.fs.put_file(str(path), self.key(name)))

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._do(name, lambda n=name: self.fs.rm_file(self.key(n)))


def run_remote(opts: ShardOptions, url: str, *, stage: str | None = None,
               keep_stage: bool = False, progress: bool = True, log=print,
               store: StoreOptions | None = None, lease_s: float = 90.0) -> ShardManifest:
    """Shard ``opts.src`` into ``url`` (s3:// or gs://) through a local staging folder. One job
    writes a prefix: it holds the prefix's lease (``shardformat.lease``) while it runs."""
    scheme = url_scheme(url)
    if scheme in READ_ONLY:
        raise ShardJobError(f"OUT: {url}: {scheme}:// folders are read-only; shard into s3:// or "
                            f"gs:// (or a local folder your web server serves)")
    bucket = _Bucket(url, store or StoreOptions())
    stage_dir = Path(stage).expanduser() if stage else default_stage(url)
    try:  # its shards are uploaded as they are: the folder must be this user's
        private_folder(stage_dir, "--stage")
    except NotPrivate as e:
        raise ShardJobError(f"staging folder: {e}") from None
    opts.out = str(stage_dir)
    from maskdm.shardformat.lease import NAME, LeaseHeld, LeaseLost, bucket_lease
    lease = bucket_lease(bucket.fs, bucket.key(NAME), redact_url(bucket.url), "maskdm shard",
                         bucket._do, ttl_s=lease_s)
    try:
        lease.acquire(log)
    except LeaseHeld as e:
        raise ShardJobError(str(e)) from None
    except FileNotFoundError as e:  # the first write: a bucket that is not there
        raise ShardJobError(f"{redact_url(url)}: {e}; create the bucket first, or check the "
                            f"URL") from None
    try:
        return _shard_and_upload(opts, url, bucket, stage_dir, lease, keep_stage=keep_stage,
                                 progress=progress, log=log)
    except LeaseLost as e:
        raise ShardJobError(str(e)) from None
    finally:
        lease.release()


def _shard_and_upload(opts: ShardOptions, url: str, bucket: _Bucket, stage_dir: Path, lease, *,
                      keep_stage: bool, progress: bool, log) -> ShardManifest:
    found = {}

    def check_bucket(job: dict) -> ShardManifest | None:
        """Before any work: is the bucket's folder this job, done, another job, or empty?"""
        listing = bucket.listing()
        theirs = bucket.read_json(JOB) if JOB in listing else None
        ours_done = theirs == job and MANIFEST in listing
        if opts.overwrite:
            stale = [n for n in listing if n.startswith("shard-") or n in (MANIFEST, SKIPPED, JOB)]
            if stale:
                log(f"--overwrite: deleting {len(stale)} object(s) in {url}")
                bucket.delete([MANIFEST] * (MANIFEST in stale)
                              + [n for n in stale if n != MANIFEST])
            listing = {}
        elif ours_done:
            from maskdm.shardformat.manifest import load_manifest
            m = load_manifest(url)
            log(f"{url}: already complete ({m.num_samples} samples in {len(m.shards)} shards); "
                f"nothing to do. `maskdm shard --verify {url}` checks it.")
            found.update(listing)
            return m
        elif theirs is not None and theirs != job:
            diff = sorted(k for k in set(theirs) | set(job) if theirs.get(k) != job.get(k))
            raise ShardJobError(f"{url} holds a different sharding job ({', '.join(diff)} differ)."
                                f" Use another prefix, or --overwrite to replace it.")
        elif theirs is None and (MANIFEST in listing or any(n.startswith("shard-")
                                                            for n in listing)):
            raise ShardJobError(f"{url} already holds shards from another tool or an older job; "
                                f"use another prefix, or --overwrite to replace them")
        found.update(listing)
        return None

    manifest = run(opts, progress=progress, log=log, before_write=check_bucket)
    if MANIFEST in found:  # complete in the bucket already: nothing was staged
        if not keep_stage:
            shutil.rmtree(stage_dir, ignore_errors=True)
        return manifest
    if (stage_dir / JOB).exists() and JOB not in found:
        bucket.put(stage_dir / JOB, JOB)
    names = [n for s in manifest.shards for n in (s.index, s.name)] + [SKIPPED]
    todo = [n for n in names if found.get(n) != (stage_dir / n).stat().st_size]
    kept = len(names) - len(todo)
    size = sum((stage_dir / n).stat().st_size for n in todo)
    from tqdm import tqdm

    from maskdm.console import show_progress
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="uploading", dynamic_ncols=True,
               disable=not (progress and show_progress()), file=sys.stderr)
    try:
        def put(name):
            bucket.put(stage_dir / name, name)
            bar.update((stage_dir / name).stat().st_size)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, todo))
    finally:
        bar.close()
    listing = bucket.listing()
    wrong = [n for n in names if listing.get(n) != (stage_dir / n).stat().st_size]
    if wrong:
        raise ShardJobError(f"{url}: after the upload {', '.join(wrong[:5])} "
                            f"{'is' if len(wrong) == 1 else 'are'} missing or of another size in "
                            f"the bucket; re-run the same command")
    lease.check()  # another job took the prefix over: its shards, not ours, are there
    bucket.put(stage_dir / MANIFEST, MANIFEST)  # last: the folder is complete
    log(f"uploaded {len(todo)} file(s), {size / 1e6:.1f} MB, to {url}"
        f"{f' ({kept} already there)' if kept else ''}"
        f"{f'; {bucket.retries} retried request(s)' if bucket.retries else ''}")
    if keep_stage:
        log(f"the staged copy stays in {stage_dir}")
    else:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return manifest
