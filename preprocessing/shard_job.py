"""The resumable sharding job: source -> plan -> worker pool -> tar shards -> manifest.

Plan: the enumerated inputs, optionally reduced to a seeded subset and shuffled (so every shard is
an i.i.d. sample of the dataset and the loader's bounded shuffle mixes well), cut into chunks of
``samples_per_shard`` inputs. Chunk ``k`` becomes ``shard-k.tar`` (fewer samples if some inputs are
skipped; no tar at all if every input was). Each chunk commits on its own:

    .shard-k.tar.tmp-PID -> shard-k.idx, shard-k.tar (renamed) -> .progress/shard-k.json (atomic)

The ``.progress`` record is the commit point; a rerun with the same arguments redoes every chunk
without one and reuses the rest. The manifest is written last. Because tars are deterministic, a
killed-and-resumed job gives byte-identical shards to an uninterrupted one.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskdm.console import plural, show_progress
from maskdm.shardformat import FORMAT_VERSION, haar
from maskdm.shardformat.fsutil import (
    atomic_write_json,
    atomic_write_text,
    remove_stale_tmp,
    tmp_name,
    url_refusal,
)
from maskdm.shardformat.manifest import MANIFEST, SKIPPED, ShardEntry, ShardManifest
from maskdm.shardformat.tarfmt import TarShardWriter, format_index

from .images import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS, Skip, decode_jpeg, encode_jpeg, prepare
from .sources import Item, ItemLoader, Source, name_record, scan

JOB = ".maskdm-job.json"
PROGRESS = ".progress"
SOURCE = "source.json"  # in PROGRESS: what the manifest needs of the scanned source


class ShardJobError(RuntimeError):
    """The job cannot run as asked; the message says why and what to do."""


class ShardDiskFull(ShardJobError):
    """The output disk filled up while writing a shard (removed again): one line with the
    folder, the space and what to do."""

    def __init__(self, folder: str, shard: str, free: int | None = None,
                 need: int | None = None):
        super().__init__(folder, shard, free, need)
        self.folder, self.shard, self.free, self.need = folder, shard, free, need

    def __str__(self) -> str:
        space = ""
        if self.free is not None:
            space = f" ({self.free / 2 ** 20:.0f} MiB free"
            space += f", the rest of the job needs about {self.need / 2 ** 20:.0f} MiB)" \
                if self.need else ")"
        return (f"disk full: {self.shard} did not fit in {self.folder}{space}; it was removed and "
                f"the finished shards are kept. Free space (or shard to a larger disk), then "
                f"re-run the same command to finish the job")


@dataclass
class ShardOptions:
    src: str
    out: str
    source: str = "folder"
    size: int = 256
    encoding: str = "dwt16"
    keep_jpeg: bool = False
    subset: float | None = None
    seed: int = 0
    shuffle: bool = True
    samples_per_shard: int = 1000
    workers: int = 0  # 0 = all usable cores
    count: int = 2048  # procedural only
    gen_seed: int = 0  # procedural only
    split: str = "train"  # vggface2 only
    bbox_csv: str | None = None  # vggface2 only
    small: str = "upscale"
    min_side: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_mb: int = DEFAULT_MAX_FILE_MB  # a larger source file (or zip member) is skipped unread
    jpeg_quality: int = 95
    overwrite: bool = False
    part: tuple[int, int] | None = None  # (I, N): this job writes part I of N (0 <= I < N)

    def validate(self) -> None:
        if self.part is not None:
            i, n = self.part
            if not (n >= 1 and 0 <= i < n):
                raise ShardJobError(f"--part I/N needs 0 <= I < N, got {i}/{n} (with a Slurm "
                                    f"array --array=0-{max(n, 1) - 1}: "
                                    f"--part $SLURM_ARRAY_TASK_ID/{max(n, 1)})")
            if self.overwrite:
                raise ShardJobError("--overwrite cannot be combined with --part: the parts share "
                                    "OUT; clear it once (or pick a new OUT) before starting them")
        for location, what in ((self.src, "SRC"), (self.out, "OUT")):
            if (refused := url_refusal(location, what, remote_ok=what == "SRC")) is not None:
                raise ShardJobError(refused)
        if self.size < 2 or self.size % 2:
            raise ShardJobError(f"--size must be a positive multiple of 2, got {self.size}")
        if self.encoding not in ("dwt16", "jpeg"):
            raise ShardJobError(f"--encoding must be dwt16 or jpeg, got {self.encoding!r}")
        if self.subset is not None and not 0.0 < self.subset <= 1.0:
            raise ShardJobError(f"--subset must be a fraction in (0, 1], got {self.subset}")
        if self.samples_per_shard < 1:
            raise ShardJobError("--samples-per-shard must be at least 1")
        if self.small not in ("upscale", "skip"):
            raise ShardJobError(f"--small must be upscale or skip, got {self.small!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ShardJobError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.bbox_csv and self.source != "vggface2":
            raise ShardJobError("--bbox-csv only applies to --source vggface2")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- planning

def plan_items(source: Source, opts: ShardOptions) -> list[Item]:
    """Deterministic selection and order: one seeded permutation gives both subset and shuffle."""
    items = source.items
    n = len(items)
    perm = np.random.default_rng(np.random.SeedSequence([opts.seed, 0x5B5E7])).permutation(n)
    if opts.subset is not None:
        k = max(1, round(opts.subset * n)) if n else 0
        perm = perm[:k]  # nested: the 1% subset is inside the 10% subset for the same seed
    if not opts.shuffle:
        perm = np.sort(perm)
    return [items[i] for i in perm]


def job_record(opts: ShardOptions, source: Source, n_planned: int) -> dict:
    keys = ("source", "size", "encoding", "keep_jpeg", "subset", "seed", "shuffle",
            "samples_per_shard", "count", "gen_seed", "split", "bbox_csv", "small", "min_side",
            "max_pixels", "jpeg_quality")
    rec = {k: getattr(opts, k) for k in keys}
    if opts.max_file_mb != DEFAULT_MAX_FILE_MB:  # (recorded only when set: older jobs resume)
        rec["max_file_mb"] = opts.max_file_mb
    rec.update(format_version=FORMAT_VERSION, src=source.root or "procedural",
               inputs=len(source.items), planned=n_planned, inputs_sha256=source.fingerprint())
    return rec


def part_chunks(n_chunks: int, part: tuple[int, int] | None) -> list[int]:
    """The chunks (shard numbers) part ``(I, N)`` writes: the I-th of N contiguous runs. A chunk's
    bytes depend on the plan alone, so any N gives the shards one job would write."""
    if part is None:
        return list(range(n_chunks))
    i, n = part
    return list(range(i * n_chunks // n, (i + 1) * n_chunks // n))


def job_chunks(job: dict) -> int:
    """The number of shards (chunks) of a job record."""
    return -(-job["planned"] // job["samples_per_shard"])


def source_summary(source: Source) -> dict:
    """What the manifest needs of the scanned source, kept beside the progress records so that
    whichever part finishes last (or ``--merge``) writes the manifest without the source."""
    return {"kind": source.kind, "root": source.root or "procedural", "found": len(source.items),
            "ignored": source.ignored, "labels": source.labels}


def describe_parts(missing: list[int], n_chunks: int) -> str:
    """'shards 3-5, 9' for a list of chunk numbers."""
    runs, start = [], None
    for k in missing + [None]:
        if start is None:
            start = prev = k
        elif k == prev + 1:
            prev = k
        else:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = k
    return f"shard{'s' if len(missing) > 1 else ''} {', '.join(runs)} of 0-{n_chunks - 1}"


# ----------------------------------------------------------------------------- worker side

_W: dict = {}


def _die_with_parent(parent_pid: int) -> None:
    """Make the kernel end this worker when the sharding job dies, even by ``kill -9`` (Linux
    ``PR_SET_PDEATHSIG``); elsewhere, and if the parent is already gone, exit now."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _init_worker(loader: ItemLoader, opts: ShardOptions, out: str, counter,
                 parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _W.update(loader=loader, opts=opts, out=Path(out), counter=counter)


def _tick() -> None:
    c = _W["counter"]
    with c.get_lock():
        c.value += 1


def _convert(pos: int, item: Item, data=None):
    """One input (``data``: its bytes, or the ``Skip`` reading them raised, when read ahead) ->
    ("ok", components, meta, sum, sumsq) or ("skip", reason, skipped record)."""
    opts: ShardOptions = _W["opts"]
    try:
        if isinstance(data, Skip):
            raise data
        if data is None:
            data = _W["loader"].load(item, max_bytes=opts.max_file_mb * 2 ** 20)
        prep = prepare(data, opts.size, bbox=item.bbox, small=opts.small, min_side=opts.min_side,
                       max_pixels=opts.max_pixels)
    except Skip as e:
        return ("skip", str(e), {**name_record(item.ref), "reason": str(e)})
    except MemoryError:
        why = "out of memory while decoding (image too large?)"
        return ("skip", why, {**name_record(item.ref), "reason": why})
    key = f"{pos:09d}"
    meta = {"key": key, **name_record(item.ref), "orig_size": list(prep.orig_size),
            "crop": [round(c, 3) for c in prep.crop], "upscaled": prep.upscaled}
    if item.label is not None:
        meta["label"] = item.label
        meta.update(name_record(item.identity, "identity"))
    comps: list[tuple[str, bytes]] = []
    if opts.encoding == "dwt16":
        coeffs, s, sq = haar.dwt_uint8_with_moments(prep.image)
        comps.append(("dwt16", coeffs.astype("<f2").tobytes()))
        if opts.keep_jpeg:
            comps.append(("jpg", encode_jpeg(prep.image, opts.jpeg_quality)))
    else:
        jpg = encode_jpeg(prep.image, opts.jpeg_quality)
        comps.append(("jpg", jpg))
        # the statistics of what the loader will see: the decoded JPEG
        s, sq = haar.image_moments(decode_jpeg(jpg))
    comps.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return ("ok", comps, meta, s, sq)


def _process_chunk(task: tuple[int, int, list[Item]]) -> dict:
    """Convert chunk ``k`` (inputs starting at position ``first``) and commit it as one shard."""
    k, first, items = task
    fetched = _W["loader"].fetching(items, _W["opts"].max_file_mb * 2 ** 20)
    return _commit_chunk(k, len(items), (_convert_ticked(first + i, item, data)
                                          for i, (item, data) in enumerate(fetched)))


def _convert_ticked(pos: int, item: Item, data=None):
    res = _convert(pos, item, data)
    _tick()
    return res


def _convert_at(args: tuple[int, Item]):
    """A pool task of the shared-conversion mode: one input, converted (see ``_write_chunks``)."""
    return _convert_ticked(*args)


def _commit_chunk(k: int, n_inputs: int, results) -> dict:
    """Write the converted inputs of chunk ``k`` (an iterable of ``_convert`` results, in input
    order) as one shard and commit it.

    Order of effects: tmp tar -> index -> tar renamed -> ``.progress`` record (the commit point).
    """
    out: Path = _W["out"]
    name = f"shard-{k:06d}"
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx"
    tmp_tar = tmp_name(tar_path)
    writer: TarShardWriter | None = None
    total, total_sq = np.zeros(12), np.zeros(12)
    skipped, upscaled = [], 0
    try:
        for res in results:
            if res[0] == "ok":
                _, comps, meta, s, sq = res
                if writer is None:
                    writer = TarShardWriter(tmp_tar)
                writer.add(meta["key"], comps)
                total += s
                total_sq += sq
                upscaled += int(meta["upscaled"])
            else:
                skipped.append(res[2])
        rec = {"name": f"{name}.tar", "index": f"{name}.idx", "samples": 0, "bytes": 0,
               "sha256": "", "sum": total.tolist(), "sumsq": total_sq.tolist(),
               "skipped": skipped, "upscaled": upscaled, "inputs": n_inputs}
        if writer is not None:
            nbytes, sha = writer.close()
            atomic_write_text(idx_path, format_index(writer.samples))
            os.replace(tmp_tar, tar_path)
            rec.update(samples=len(writer.samples), bytes=nbytes, sha256=sha)
        atomic_write_json(out / PROGRESS / f"{name}.json", rec)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        Path(tmp_tar).unlink(missing_ok=True)  # never a partial shard on disk
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise ShardDiskFull(str(out), name) from None
        raise
    return rec


# ----------------------------------------------------------------------------- parent side


def _lock(out: Path, part: tuple[int, int] | None = None):
    """This job's lock file in OUT: the whole job's, or one per part (parts run side by side)."""
    name = ".lock" if part is None else f".lock-part-{part[0]}-of-{part[1]}"
    f = open(out / name, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        what = "" if part is None else f" part {part[0]}/{part[1]} of"
        raise ShardJobError(f"another `maskdm shard` is writing{what} {out}; wait for it to "
                            f"finish or stop it first") from None
    if part is None:  # a whole job tidies every shard's leftovers: no part may be writing
        for other in sorted(out.glob(".lock-part-*-of-*")):
            with open(other, "a") as g:
                try:
                    fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    i, n = other.name[len(".lock-part-"):].split("-of-")
                    raise ShardJobError(f"part {i}/{n} of this job is writing {out}; run the "
                                        f"whole job once the parts are done (or run the "
                                        f"missing parts with --part)") from None
    return f


def _clear_outputs(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.idx")):
        p.unlink()
    for name in (MANIFEST, SKIPPED, JOB, "preview.png"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)


def record_ok(rec, k: int) -> bool:
    """Is ``rec`` a well-formed progress record of shard ``k``? Records are read back from OUT (a
    shared folder, a bucket) that others can write: a record that names other files, or holds
    anything but the counts and sums this job writes, is not taken (the shard is redone)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def sums(v):
        return isinstance(v, list) and len(v) == 12 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    try:
        return (isinstance(rec, dict) and rec["name"] == f"shard-{k:06d}.tar"
                and rec["index"] == f"shard-{k:06d}.idx" and count(rec["samples"])
                and count(rec["bytes"]) and isinstance(rec["sha256"], str)
                and sums(rec["sum"]) and sums(rec["sumsq"]) and count(rec["upscaled"])
                and count(rec["inputs"]) and isinstance(rec["skipped"], list)
                and all(isinstance(x, dict) for x in rec["skipped"]))
    except (KeyError, TypeError):
        return False


def _load_done(out: Path, chunks) -> dict[int, dict]:
    """Those of ``chunks`` (shard numbers) committed in ``out``: progress record present and
    well-formed, its tar/idx intact on disk."""
    done = {}
    prog = out / PROGRESS
    for k in chunks:
        p = prog / f"shard-{k:06d}.json"
        if not p.exists():
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not record_ok(rec, k):
            continue
        if rec["samples"] > 0:
            tar, idx = out / rec["name"], out / rec["index"]
            if not (tar.exists() and idx.exists() and tar.stat().st_size == rec["bytes"]):
                continue
        done[k] = rec
    return done


class Output:
    """Where committed shards end up: OUT itself (this class), or a bucket the shards are
    uploaded to as they are committed in a staging folder (``upload.BucketOutput``)."""

    def begin(self, out: Path) -> None:
        """``out`` holds the job record and the source summary; no shard is written yet."""

    def done(self, out: Path, chunks: list[int]) -> dict[int, dict]:
        """The progress records of those of ``chunks`` complete at the destination beyond what
        ``out`` holds (OUT itself is the destination: none)."""
        return {}

    def committed(self, out: Path, rec: dict) -> None:
        """Chunk ``rec`` was just committed in ``out``."""

    def backlog(self) -> int:
        """Committed chunks not at the destination yet (the staging folder holds them)."""
        return 0

    def flush(self) -> None:
        """Wait until every committed chunk is at the destination."""

    def records(self, out: Path, n_chunks: int) -> dict[int, dict]:
        """Every chunk's progress record there is (every part's), for the manifest."""
        return _load_done(out, range(n_chunks))

    def finished(self, out: Path) -> ShardManifest | None:
        """The destination's manifest, if a part (or --merge) has written it already."""
        if not (out / MANIFEST).exists():
            return None
        from maskdm.shardformat.manifest import load_manifest
        return load_manifest(out)

    def publish(self, out: Path, manifest: ShardManifest) -> None:
        """``out`` now holds ``skipped.jsonl`` and the manifest."""


def run(opts: ShardOptions, *, progress: bool = True, log=print,
        before_write=None, output: Output | None = None) -> ShardManifest | None:
    """Run (or resume, or confirm) the sharding job described by ``opts``. ``before_write(job)``
    (the upload's check of its bucket) runs once the job record is known; a manifest it returns
    ends the job there. With ``opts.part``, only that part's shards are written; the part that
    finds every shard done writes the manifest; the others return None."""
    opts.validate()
    out = Path(opts.out).expanduser().resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out, opts.part)
    try:
        return _run_locked(opts, out, progress, log, before_write, output or Output())
    except BaseException:
        # a job refused before writing anything (no images, bad source) leaves no folder behind
        if created and [p.name for p in out.iterdir()] == [lock.name.rsplit("/", 1)[-1]]:
            Path(lock.name).unlink()
            out.rmdir()
        raise
    finally:
        lock.close()


def _run_locked(opts: ShardOptions, out: Path, progress: bool, log,
                before_write, output: Output) -> ShardManifest | None:
    t0 = time.time()
    source = scan(opts.source, opts.src, exclude=str(out), count=opts.count,
                  gen_seed=opts.gen_seed, image_size=opts.size, split=opts.split,
                  bbox_csv=opts.bbox_csv)
    if not source.items:
        raise ShardJobError(f"no images found in {opts.src} (looked for "
                            f"{'.jpg/.png/...' if opts.source != 'procedural' else 'procedural'} "
                            f"files; ignored: {source.ignored or 'nothing'})")
    planned = plan_items(source, opts)
    job = job_record(opts, source, len(planned))
    if before_write is not None and (done := before_write(job)) is not None:
        return done

    job_path = out / JOB
    if opts.overwrite:
        _clear_outputs(out)
    elif job_path.exists():
        _check_same_job(out, job)
        if (out / MANIFEST).exists():
            from maskdm.shardformat.manifest import load_manifest
            m = load_manifest(out)
            shutil.rmtree(out / PROGRESS, ignore_errors=True)
            log(f"{out}: already complete ({plural(m.num_samples, 'sample')} in "
                f"{plural(len(m.shards), 'shard')}); "
                f"nothing to do. `maskdm shard --verify {out}` checks it.")
            output.publish(out, m)
            return m
    elif (out / MANIFEST).exists() or any(out.glob("shard-*.tar")):
        raise ShardJobError(f"{out} already holds shards from another tool or an older job; "
                            f"use a new output folder, or --overwrite to replace them")
    atomic_write_json(job_path, job)  # (parts write the same bytes)
    (out / PROGRESS).mkdir(exist_ok=True)
    atomic_write_json(out / PROGRESS / SOURCE, source_summary(source))
    output.begin(out)

    spc = opts.samples_per_shard
    n_chunks = job_chunks(job)
    mine = part_chunks(n_chunks, opts.part)
    _remove_stale_tmp(out, mine if opts.part else None)
    done = output.done(out, mine)
    for k, rec in _load_done(out, mine).items():  # committed here by an earlier run
        if k not in done:  # (and not at the destination yet: a bucket)
            output.committed(out, rec)
            done[k] = rec
    todo = [k for k in mine if k not in done]
    resumed = len(done)
    for k in todo:  # a tar renamed just before a crash, without its commit record
        (out / f"shard-{k:06d}.tar").unlink(missing_ok=True)
        (out / f"shard-{k:06d}.idx").unlink(missing_ok=True)
    what = (f"part {opts.part[0]}/{opts.part[1]}: "
            + (f"shard {mine[0]}" if len(mine) == 1 else f"shards {mine[0]}-{mine[-1]}")
            + f" of {n_chunks}") if opts.part and mine else None
    if opts.part and not mine:
        what = f"part {opts.part[0]}/{opts.part[1]}: no shards (the job has only {n_chunks})"
    if what:
        log(what)
    if resumed:
        log(f"resuming: {resumed} of {len(mine)} shards already complete")

    workers = opts.workers or usable_cores()
    n_todo = sum(min(spc, len(planned) - k * spc) for k in todo)
    if n_todo:
        _write_chunks(opts, out, source, planned, todo, workers, n_todo, progress, done, output)
    output.flush()
    dt = time.time() - t0
    manifest = finalize_when_complete(out, job, n_chunks, output, log)
    if manifest is None:
        log(f"wrote {plural(len(todo), 'shard')} of part {opts.part[0]}/{opts.part[1]} in "
            f"{dt:.1f}s ({n_todo / max(dt, 1e-9):.0f} img/s)")
        return None
    src = manifest.source
    if opts.part:
        log(f"part {opts.part[0]}/{opts.part[1]}: wrote {plural(len(todo), 'shard')} in "
            f"{dt:.1f}s ({n_todo / max(dt, 1e-9):.0f} img/s), the last part to finish:")
    log(f"wrote {plural(src['written'], 'sample')} in {plural(len(manifest.shards), 'shard')} "
        f"to {out} "
        f"({src['skipped']} skipped, {src['upscaled']} upscaled, {src['found']} found"
        f"{', ' + str(sum(source.ignored.values())) + ' non-image files ignored' if source.ignored else ''})"
        f" in {dt:.1f}s ({n_todo / max(dt, 1e-9):.0f} img/s)")
    if src["skipped"]:
        log(f"skipped inputs and reasons: {out / SKIPPED}")
    return manifest


def _check_same_job(out: Path, job: dict, where: str | None = None) -> None:
    old = json.loads((out / JOB).read_text())
    diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
    if diff:
        raise ShardJobError(
            f"{where or out} holds a different sharding job ({', '.join(diff)} differ"
            f"{'; the source files changed' if 'inputs_sha256' in diff else ''}). "
            f"Use a new output folder, or --overwrite to discard it.")


def _remove_stale_tmp(out: Path, chunks: list[int] | None) -> None:
    """Leftovers of interrupted writes: all of them, or (a part, while other parts may be
    writing theirs) only those of its own shards."""
    if chunks is None:
        remove_stale_tmp(out)
        remove_stale_tmp(out / PROGRESS)
        return
    for k in chunks:
        for folder, name in ((out, f"shard-{k:06d}.tar"), (out, f"shard-{k:06d}.idx"),
                             (out / PROGRESS, f"shard-{k:06d}.json")):
            for p in folder.glob(f".{name}.tmp-*"):
                p.unlink(missing_ok=True)


def finalize_when_complete(out: Path, job: dict, n_chunks: int, output: Output,
                           log) -> ShardManifest | None:
    """Write the manifest if every shard of the job is done (whichever part finishes last does
    it; ``--merge`` too); None, said in the log, while shards are missing."""
    with _finalize_lock(out):
        if (m := output.finished(out)) is not None:  # another part finished it meanwhile
            return m
        done = output.records(out, n_chunks)
        missing = [k for k in range(n_chunks) if k not in done]
        if missing:
            log(f"{describe_parts(missing, n_chunks)} not written yet: the last part to finish "
                f"writes the manifest (or `maskdm shard --merge OUT` once they are done)")
            return None
        try:
            summary = json.loads((out / PROGRESS / SOURCE).read_text())
            if not _summary_ok(summary):
                raise ValueError
        except (OSError, ValueError):
            raise ShardJobError(f"{out / PROGRESS / SOURCE} is missing or damaged; re-run any "
                                f"part of the job (it is rewritten at its start)") from None
        manifest = _finalize(job, out, summary, n_chunks, done)
        output.publish(out, manifest)
        shutil.rmtree(out / PROGRESS, ignore_errors=True)
        return manifest


def _summary_ok(v) -> bool:
    try:
        return (isinstance(v["kind"], str) and isinstance(v["root"], str)
                and isinstance(v["found"], int) and isinstance(v["ignored"], dict)
                and all(isinstance(n, int) for n in v["ignored"].values())
                and (v["labels"] is None or (isinstance(v["labels"], dict) and all(
                    isinstance(n, int) for n in v["labels"].values()))))
    except (KeyError, TypeError):
        return False


def job_ok(job) -> bool:
    """A job record read back from OUT (``--merge``): the fields the manifest is made from."""
    try:
        ints = ("planned", "samples_per_shard", "size", "seed", "count", "gen_seed")
        return (all(isinstance(job[k], int) and not isinstance(job[k], bool) for k in ints)
                and job["samples_per_shard"] > 0 and job["planned"] >= 0 and job["size"] >= 2
                and job["encoding"] in ("dwt16", "jpeg") and isinstance(job["keep_jpeg"], bool)
                and isinstance(job["shuffle"], bool)
                and (job["subset"] is None or isinstance(job["subset"], (int, float))))
    except (KeyError, TypeError):
        return False


def _finalize_lock(out: Path):
    """Held while the manifest is written: parts finishing together write it once."""
    f = open(out / ".lock-finalize", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def merge(out_dir: str, *, log=print, output: Output | None = None) -> ShardManifest:
    """``maskdm shard --merge OUT``: the manifest of a job whose parts are all done (idempotent:
    a complete folder is left as it is)."""
    out = Path(out_dir).expanduser().resolve()
    if not (out / JOB).exists():
        raise ShardJobError(f"{out} holds no sharding job ({JOB} is missing): run the parts "
                            f"first (maskdm shard SRC OUT --part I/N)")
    try:
        job = json.loads((out / JOB).read_text())
    except (OSError, ValueError):
        job = None
    if not job_ok(job):
        raise ShardJobError(f"{out / JOB} is not a maskdm sharding job record (damaged?); "
                            f"re-run a part of the job to rewrite it")
    if not (out / MANIFEST).exists() and not (out / PROGRESS / SOURCE).exists():
        raise ShardJobError(f"{out}: no part has started writing it ({PROGRESS}/{SOURCE} is "
                            f"missing)")
    m = finalize_when_complete(out, job, job_chunks(job), output or Output(), log)
    if m is None:
        raise ShardJobError(f"{out} is not complete yet; run the missing parts (same command, "
                            f"same --part), then --merge again")
    return m


def _wait_backlog(output: Output, most: int) -> None:
    while output.backlog() > most:
        time.sleep(0.05)


class _LocalCounter:
    """Stands in for a shared ``multiprocessing.Value`` when converting in-process."""

    def __init__(self, on_tick):
        self._v, self._on_tick = 0, on_tick
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock

    @property
    def value(self):
        return self._v

    @value.setter
    def value(self, v):
        self._on_tick(v - self._v)
        self._v = v


def _write_chunks(opts, out, source, planned, todo, workers, n_todo, progress, done,
                  output: Output) -> None:
    """Convert the ``todo`` chunks, one chunk per task; each worker commits its own shards.
    ``output.committed`` hears of each; new chunks start only while fewer than ``2 x workers``
    are in work or waiting for ``output`` (an upload), which bounds the staging folder."""
    from tqdm import tqdm

    spc = opts.samples_per_shard
    tasks = [(k, k * spc, planned[k * spc:(k + 1) * spc]) for k in todo]
    interrupted = {"sig": None}

    def on_term(signum, frame):
        interrupted["sig"] = signum
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    bar = tqdm(total=n_todo, unit="img", desc="sharding", mininterval=0.5, dynamic_ncols=True,
               disable=not (progress and show_progress()), file=sys.stderr)
    pool = None
    try:
        if workers == 1 or len(tasks) == 1:  # in-process: no start-up cost, direct tracebacks
            old_int = signal.getsignal(signal.SIGINT)
            _init_worker(source.loader(), opts, str(out), _LocalCounter(bar.update))
            signal.signal(signal.SIGINT, old_int)
            for t in tasks:
                done[t[0]] = _process_chunk(t)
                output.committed(out, done[t[0]])
                _wait_backlog(output, 1)
                bar.set_postfix(shards=len(done), refresh=False)
        elif len(tasks) < workers:
            # fewer shards than workers (a small subset, big shards): every worker converts
            # inputs of the same shard, this process writes it; the same bytes as one chunk per
            # worker, and no core idles
            ctx = mp.get_context("spawn")
            counter = ctx.Value("q", 0)
            pool = ctx.Pool(workers, initializer=_init_worker,
                            initargs=(source.loader(), opts, str(out), counter, os.getpid()))
            _W.update(out=out)
            seen = [0]

            def ticked(results):
                for r in results:
                    bar.update(counter.value - seen[0])
                    seen[0] = counter.value
                    yield r
            for k, first, items in tasks:
                results = pool.imap(_convert_at, [(first + i, it) for i, it in enumerate(items)],
                                    chunksize=4)
                done[k] = _commit_chunk(k, len(items), ticked(results))
                output.committed(out, done[k])
                _wait_backlog(output, 1)
                bar.set_postfix(shards=len(done), refresh=False)
            pool.close()
            pool.join()
        else:
            ctx = mp.get_context("spawn")
            counter = ctx.Value("q", 0)
            pool = ctx.Pool(min(workers, len(tasks)), initializer=_init_worker,
                            initargs=(source.loader(), opts, str(out), counter, os.getpid()))
            queue, pending, seen = list(tasks), [], 0
            window = 2 * workers
            while queue or pending:
                while queue and len(pending) + output.backlog() < window:
                    pending.append(pool.apply_async(_process_chunk, (queue.pop(0),)))
                time.sleep(0.2)
                bar.update(counter.value - seen)
                seen = counter.value
                still = []
                for r in pending:
                    if r.ready():
                        rec = r.get()  # re-raises a worker's unexpected exception here
                        done[int(rec["name"][6:12])] = rec
                        output.committed(out, rec)
                        bar.set_postfix(shards=len(done), refresh=False)
                    else:
                        still.append(r)
                pending = still
            bar.update(counter.value - seen)
            pool.close()
            pool.join()
    except ShardDiskFull as e:
        if pool is not None:  # the other workers' shards in progress: stopped, then removed
            pool.terminate()
            pool.join()
        remove_stale_tmp(out)
        finished = [r for r in done.values() if r["inputs"]]
        per_input = (sum(r["bytes"] for r in finished) / sum(r["inputs"] for r in finished)
                     if finished else None)
        left = sum(len(t[2]) for t in tasks if t[0] not in done)
        raise ShardDiskFull(e.folder, e.shard, shutil.disk_usage(out).free,
                            int(per_input * left) if per_input else None) from None
    except KeyboardInterrupt:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
        what = "SIGTERM" if interrupted["sig"] == signal.SIGTERM else "interrupted"
        print(f"\n{what}: {plural(len(done), 'shard')} complete and kept; re-run the same "
              f"command to "
              f"finish the job.", file=sys.stderr)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        signal.signal(signal.SIGTERM, old_term)
        bar.close()


def _finalize(job: dict, out: Path, summary: dict, n_chunks: int, done) -> ShardManifest:
    """The manifest and ``skipped.jsonl`` from every chunk's progress record (in shard order, so
    any split into parts sums the same statistics in the same order)."""
    total = np.zeros(12)
    total_sq = np.zeros(12)
    shards, skipped, upscaled = [], [], 0
    for k in range(n_chunks):
        rec = done[k]
        total += np.asarray(rec["sum"])
        total_sq += np.asarray(rec["sumsq"])
        skipped.extend(rec["skipped"])
        upscaled += rec["upscaled"]
        if rec["samples"]:
            shards.append(ShardEntry(rec["name"], rec["index"], rec["samples"], rec["bytes"],
                                     rec["sha256"]))
    written = sum(s.samples for s in shards)
    if written == 0:
        _write_skipped(out, skipped)
        raise ShardJobError(f"every input was skipped ({len(skipped)}); reasons in "
                            f"{out / SKIPPED}")
    size = job["size"]
    half = size // 2
    n_el = written * half * half
    mean = total / n_el
    std = np.sqrt(np.maximum(total_sq / n_el - mean ** 2, 0.0))
    components = (["dwt16"] + (["jpg"] if job["keep_jpeg"] else []) if job["encoding"] == "dwt16"
                  else ["jpg"]) + ["json"]
    kind = summary["kind"]
    manifest = ShardManifest(
        source={"kind": kind,
                **name_record(summary["root"], "path"),
                "found": summary["found"], "selected": job["planned"], "written": written,
                "skipped": len(skipped), "upscaled": upscaled,
                "ignored": sum(summary["ignored"].values()),
                "ignored_by_extension": summary["ignored"],
                **({"count": job["count"], "gen_seed": job["gen_seed"]}
                   if kind == "procedural" else {})},
        image_size=size, encoding=job["encoding"], components=components,
        channel_mean=[round(float(v), 6) for v in mean],
        channel_std=[round(float(v), 6) for v in std],
        shards=shards,
        subset={"fraction": job["subset"], "seed": job["seed"]}
        if job["subset"] is not None else None,
        shuffle_seed=job["seed"] if job["shuffle"] else None,
        labels=({name_record(k, "k")["k"]: v for k, v in summary["labels"].items()}
                if summary["labels"] is not None else None),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tool=f"maskdm {tool_version()}",
        tensor={"shape": [12, half, half], "dtype": "float16", "byte_order": "little",
                "layout": "subband-major (LL, H, V, D), each R, G, B"},
    )
    _write_skipped(out, skipped)
    atomic_write_json(out / MANIFEST, manifest.to_json())
    return manifest


def _write_skipped(out: Path, skipped: list[dict]) -> None:
    atomic_write_text(out / SKIPPED, "".join(json.dumps(s) + "\n" for s in skipped))


def tool_version() -> str:
    try:
        from importlib.metadata import version
        return version("maskdm")
    except Exception:  # running from a source tree that is not installed
        return "dev"
