"""``maskdm shard SRC s3://bucket/prefix``: shards are uploaded as they are made.

The sharding job is the local, resumable one (``shard_job``), run in a staging folder on this
machine (``--stage``; default ``~/.cache/maskdm/staging/NAME-HASH``), with a ``BucketOutput``:
the job record and the source summary go up first (so a re-run, or another part, knows whose
partial upload the bucket holds); each committed shard's index and tar are uploaded (skipping
objects already there with the same size), then its progress record, and the staged copy is
deleted, so the stage holds only the shards in work or waiting for their upload (at most
``2 x workers``). A killed job re-run finds its finished shards by their records in the bucket
and redoes only the others, with the same bytes. The part that finds every shard's record there
(one job, or the last of ``--part I/N``, or ``--merge``) uploads ``skipped.jsonl`` and the
manifest last: a folder with a manifest is complete. Objects in S3 and GCS appear whole or not
at all, so a cut upload leaves nothing a reader can see.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
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

from .shard_job import (
    JOB,
    PROGRESS,
    SOURCE,
    Output,
    ShardJobError,
    ShardOptions,
    job_ok,
    record_ok,
    run,
)

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

    def listing(self, sub: str | None = None) -> dict[str, int]:
        """Name -> size of the files in the folder (or its subfolder ``sub``)."""
        return list_files(self.fs, self.key(sub) if sub else self.root, self._do)

    def remove_tree(self, sub: str) -> None:
        """Delete the files of subfolder ``sub`` (best effort: what another writer removed
        first is not an error)."""
        keys = [self.key(f"{sub}/{n}") for n in self.listing(sub)]
        for i in range(0, len(keys), 1000):  # (s3fs deletes up to 1000 per request)
            try:
                self.patience.call(lambda batch=keys[i:i + 1000]: self.fs.rm(batch), sub)
            except (FileNotFoundError, RemoteError):
                pass

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


class BucketOutput(Output):
    """The destination of a sharding job in a bucket: uploads each committed shard from the
    staging folder (a few at a time, in threads) and deletes its staged copy."""

    def __init__(self, bucket: _Bucket, lease, *, keep_stage: bool,
                 listing: dict[str, int] | None = None):
        self.bucket, self.lease, self.keep_stage = bucket, lease, keep_stage
        self.listing = dict(listing or {})  # the folder's files when the job started
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="maskdm-upload")
        self.pending: list[Future] = []
        self.handled: set[str] = set()
        self.uploaded, self.kept, self.sent_bytes = 0, 0, 0
        self._lock = threading.Lock()

    def _records(self, chunks) -> dict[int, dict]:
        """The well-formed progress records of ``chunks`` in the bucket (PROGRESS/shard-k.json,
        each uploaded after its shard's files); a missing or forged one: the shard is redone."""
        there = self.bucket.listing(PROGRESS)
        ks = [k for k in chunks if f"shard-{k:06d}.json" in there]
        with ThreadPoolExecutor(16) as pool:
            recs = pool.map(lambda k: self.bucket.read_json(f"{PROGRESS}/shard-{k:06d}.json"), ks)
            return {k: rec for k, rec in zip(ks, recs) if rec is not None and record_ok(rec, k)}

    def begin(self, out: Path) -> None:
        if JOB not in self.listing:
            self.bucket.put(out / JOB, JOB)
        self.bucket.put(out / PROGRESS / SOURCE, f"{PROGRESS}/{SOURCE}")

    def done(self, out: Path, chunks: list[int]) -> dict[int, dict]:
        recs = self._records(chunks)
        listing = self.bucket.listing()
        return {k: r for k, r in recs.items()  # its files must be there with their sizes
                if not r["samples"] or (listing.get(r["name"]) == r["bytes"]
                                        and r["index"] in listing)}

    def _put(self, path: Path, name: str) -> None:
        size = path.stat().st_size
        if self.listing.get(name) == size:
            with self._lock:
                self.kept += 1
            return
        self.bucket.put(path, name)
        with self._lock:
            self.uploaded += 1
            self.sent_bytes += size

    def _upload(self, out: Path, rec: dict) -> None:
        files = [rec["index"], rec["name"]] if rec["samples"] else []
        for name in files:
            self._put(out / name, name)
        self._check_lease()  # another job took the prefix over: its records, not ours
        record = f"{PROGRESS}/{rec['name'][:-4]}.json"
        self.bucket.put(out / record, record)
        if not self.keep_stage:
            for name in files:
                (out / name).unlink(missing_ok=True)

    def committed(self, out: Path, rec: dict) -> None:
        self.handled.update([rec["index"], rec["name"]])
        self.pending.append(self.pool.submit(self._upload, out, rec))

    def backlog(self) -> int:
        still = []
        for f in self.pending:
            if f.done():
                f.result()  # an upload that failed stops the job here, with its message
            else:
                still.append(f)
        self.pending = still
        return len(still)

    def flush(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []

    def finished(self, out: Path) -> ShardManifest | None:
        if MANIFEST not in self.bucket.listing():
            return None
        from maskdm.shardformat.manifest import load_manifest
        return load_manifest(self.bucket.url)

    def records(self, out: Path, n_chunks: int) -> dict[int, dict]:
        return self._records(range(n_chunks))

    def publish(self, out: Path, manifest: ShardManifest) -> None:
        """The staged shards the bucket lacks (a complete stage), ``skipped.jsonl``, a check that
        every shard is there with its size, and the manifest last."""
        for s in manifest.shards:
            for name in (s.index, s.name):
                if name not in self.handled and (out / name).exists():
                    self.handled.add(name)
                    self._put(out / name, name)
        self._put(out / SKIPPED, SKIPPED)
        listing = self.bucket.listing()
        wrong = [s.name for s in manifest.shards if listing.get(s.name) != s.bytes] + \
            [s.index for s in manifest.shards if s.index not in listing]
        if wrong:
            raise ShardJobError(f"{redact_url(self.bucket.url)}: {', '.join(wrong[:5])} "
                                f"{'is' if len(wrong) == 1 else 'are'} missing or of another size "
                                f"in the bucket; re-run the same command")
        self._check_lease()
        self.bucket.put(out / MANIFEST, MANIFEST)  # last: the folder is complete
        self.bucket.remove_tree(PROGRESS)  # (best effort: the manifest is what readers use)

    def _check_lease(self) -> None:
        if self.lease is not None:  # (--merge holds none: it writes only the manifest)
            self.lease.check()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def lease_name(part: tuple[int, int] | None) -> str:
    """One lease per writer of a prefix: the job's, or each part's (parts write side by side)."""
    from maskdm.shardformat.lease import NAME
    return NAME if part is None else f".maskdm-lease-part-{part[0]}-of-{part[1]}.json"


def run_remote(opts: ShardOptions, url: str, *, stage: str | None = None,
               keep_stage: bool = False, progress: bool = True, log=print,
               store: StoreOptions | None = None, lease_s: float = 90.0) -> ShardManifest | None:
    """Shard ``opts.src`` into ``url`` (s3:// or gs://), uploading as it goes. One job (or one
    job per part) writes a prefix: it holds its lease (``shardformat.lease``) while it runs."""
    scheme = url_scheme(url)
    if scheme in READ_ONLY:
        raise ShardJobError(f"OUT: {url}: {scheme}:// folders are read-only; shard into s3:// or "
                            f"gs:// (or a local folder your web server serves)")
    bucket = _Bucket(url, store or StoreOptions())
    stage_dir = _stage(url, stage, opts.part)
    opts.out = str(stage_dir)
    from maskdm.shardformat.lease import LeaseHeld, LeaseLost, bucket_lease
    lease = bucket_lease(bucket.fs, bucket.key(lease_name(opts.part)), redact_url(bucket.url),
                         "maskdm shard", bucket._do, ttl_s=lease_s)
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


def _stage(url: str, stage: str | None, part: tuple[int, int] | None) -> Path:
    stage_dir = Path(stage).expanduser() if stage else default_stage(url)
    if part is not None and not stage:  # parts on one machine must not share a stage
        stage_dir = stage_dir.with_name(f"{stage_dir.name}-part-{part[0]}-of-{part[1]}")
    try:  # its shards are uploaded as they are: the folder must be this user's
        private_folder(stage_dir, "--stage")
    except NotPrivate as e:
        raise ShardJobError(f"staging folder: {e}") from None
    return stage_dir


def _shard_and_upload(opts: ShardOptions, url: str, bucket: _Bucket, stage_dir: Path, lease, *,
                      keep_stage: bool, progress: bool, log) -> ShardManifest | None:
    found: dict[str, int] = {}
    output = BucketOutput(bucket, lease, keep_stage=keep_stage)

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
            bucket.remove_tree(PROGRESS)
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
        output.listing = dict(listing)
        return None

    try:
        manifest = run(opts, progress=progress, log=log, before_write=check_bucket,
                       output=output)
    finally:
        output.close()
    if MANIFEST in found:  # complete in the bucket already: nothing was staged
        if not keep_stage:
            shutil.rmtree(stage_dir, ignore_errors=True)
        return manifest
    log(f"uploaded {output.uploaded} file(s), {output.sent_bytes / 1e6:.1f} MB, to {url}"
        f"{f' ({output.kept} already there)' if output.kept else ''}"
        f"{f'; {bucket.retries} retried request(s)' if bucket.retries else ''}")
    if keep_stage:
        log(f"the staged copy stays in {stage_dir}")
    else:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return manifest


def merge_remote(url: str, *, stage: str | None = None, log=print,
                 store: StoreOptions | None = None) -> ShardManifest:
    """``maskdm shard --merge s3://...``: the manifest of a job whose parts are all done in the
    bucket (a complete folder is left as it is)."""
    from maskdm.shardformat.manifest import load_manifest

    from .shard_job import finalize_when_complete, job_chunks
    bucket = _Bucket(url, store or StoreOptions())
    listing = bucket.listing()
    if MANIFEST in listing:
        return load_manifest(url)
    job = bucket.read_json(JOB) if JOB in listing else None
    if job is None:
        raise ShardJobError(f"{redact_url(url)} holds no sharding job ({JOB} is missing): run "
                            f"the parts first (maskdm shard SRC OUT --part I/N)")
    if not job_ok(job):
        raise ShardJobError(f"{redact_url(url)}/{JOB} is not a maskdm sharding job record "
                            f"(damaged?); re-run a part of the job to rewrite it")
    summary = bucket.read_json(f"{PROGRESS}/{SOURCE}")
    if summary is None:
        raise ShardJobError(f"{redact_url(url)}: no part has started writing it "
                            f"({PROGRESS}/{SOURCE} is missing)")
    stage_dir = _stage(url, stage, None)
    (stage_dir / PROGRESS).mkdir(parents=True, exist_ok=True)
    from maskdm.shardformat.fsutil import atomic_write_json
    atomic_write_json(stage_dir / PROGRESS / SOURCE, summary)

    out = BucketOutput(bucket, None, keep_stage=True, listing=listing)
    try:
        m = finalize_when_complete(stage_dir, job, job_chunks(job), out, log)
    finally:
        out.close()
        shutil.rmtree(stage_dir, ignore_errors=True)
    if m is None:
        raise ShardJobError(f"{redact_url(url)} is not complete yet; run the missing parts (same "
                            f"command, same --part), then --merge again")
    return m
