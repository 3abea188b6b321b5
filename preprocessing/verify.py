"""``maskdm shard --verify``: prove a shard directory is intact, or say exactly what is damaged.

Per shard: size and sha256 against the manifest; the index parses and equals what the tar's headers
say; sample count and components match the manifest; every ``dwt16`` tensor inverts to integral
pixels in [0, 255] whose forward DWT gives back the stored bits (the lossless round trip); every
``jpg`` decodes; every ``json`` parses and names its own key. Directory level: totals, skipped.jsonl,
files the manifest does not list.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maskdm.shardformat import haar
from maskdm.shardformat.fsutil import sha256_file
from maskdm.shardformat.manifest import SKIPPED, DatasetError, ShardEntry, load_manifest
from maskdm.shardformat.tarfmt import BadIndex, read_index, sample_key, scan_tar

from .images import decode_jpeg


@dataclass
class VerifyReport:
    directory: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: str = ""  # what an OK means, said in the report


    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(args) -> tuple[str, int, list[str]]:
    """Verify one shard; returns (name, samples checked, problems)."""
    directory, entry, image_size, components, quick, where = args
    entry = ShardEntry(**entry)
    tar, idx = Path(directory) / entry.name, Path(directory) / entry.index
    problems: list[str] = []
    if not tar.exists():
        return entry.name, 0, [f"{entry.name}: missing {where} (listed in the manifest)"]
    size = tar.stat().st_size
    if size != entry.bytes:
        problems.append(f"{entry.name}: {size} bytes {where}, manifest says {entry.bytes} "
                        f"(truncated or overwritten)")
    elif sha256_file(tar) != entry.sha256:
        problems.append(f"{entry.name}: sha256 mismatch (its contents {where} changed since it "
                        f"was written)")
    try:
        on_disk = scan_tar(tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{entry.name}: not a readable tar ({type(e).__name__}: {e})")
        on_disk = None
    if on_disk is not None and len(on_disk) != entry.samples:
        problems.append(f"{entry.name}: holds {len(on_disk)} samples, manifest says {entry.samples}")
    index = None
    if not idx.exists():
        problems.append(f"{entry.index}: missing DALI index (re-run `maskdm shard` into a new "
                        f"folder, or regenerate it with `wds2idx {entry.name} {entry.index}`)")
    else:
        try:
            index = read_index(idx)
        except BadIndex as e:
            problems.append(str(e))
    if index is not None and on_disk is not None and index != on_disk:
        problems.append(f"{entry.index}: does not match the tar's contents")
    if problems or quick:
        return entry.name, 0, problems

    checked = 0
    with open(tar, "rb") as f:
        for sample in index:
            key = sample_key(sample)
            exts = [c.ext for c in sample]
            if sorted(exts) != sorted(components):
                problems.append(f"{entry.name}/{key}: components {exts}, expected {components}")
                continue
            data = {}
            for c in sample:
                f.seek(c.offset)
                data[c.ext] = f.read(c.size)
            try:
                if "dwt16" in data:
                    coeffs = haar.decode_dwt16(data["dwt16"], image_size)
                    pixels = haar.idwt_uint8(coeffs)
                    # values, not bytes: shards from before 0.2.1 may hold -0.0 for a zero
                    if not np.array_equal(haar.dwt_uint8(pixels), coeffs):
                        raise haar.NotLossless("forward DWT of the inverse differs from the stored bits")
                if "jpg" in data:
                    img = decode_jpeg(data["jpg"])
                    if img.shape != (image_size, image_size, 3):
                        raise ValueError(f"jpg is {img.shape}, expected {image_size}x{image_size}x3")
                meta = json.loads(data["json"])
                if meta.get("key") != key:
                    raise ValueError(f"json names key {meta.get('key')!r}")
            except Exception as e:  # report every kind of damage, keep checking the rest
                problems.append(f"{entry.name}/{key}: {type(e).__name__}: {e}")
                continue
            checked += 1
    return entry.name, checked, problems


def verify(directory: str | os.PathLike, *, workers: int = 0, quick: bool = False,
           progress: bool = True, where: str = "on disk") -> VerifyReport:
    """``where``: how problems name the place the bytes came from (a bucket's cached copy is
    verified as a local folder, its problems said to be "in the bucket ...")."""
    from tqdm import tqdm

    from maskdm.shardformat.fsutil import url_refusal
    from maskdm.shardformat.remote import is_remote
    if (refused := url_refusal(directory, "shard folder", remote_ok=True)) is not None:
        report = VerifyReport(str(directory))
        report.problems.append(refused)
        return report
    if is_remote(directory):
        return _verify_remote(str(directory), workers=workers, quick=quick, progress=progress)
    directory = Path(directory).resolve()
    report = VerifyReport(str(directory), checked="checksums, counts and indexes" if quick else "")
    try:
        m = load_manifest(directory)
    except DatasetError as e:
        report.problems.append(str(e))
        return report
    report.shards = len(m.shards)
    listed = {s.name for s in m.shards} | {s.index for s in m.shards}
    for p in sorted(directory.glob("shard-*")):
        if p.name not in listed:
            report.warnings.append(f"{p.name}: not listed in the manifest (left over? not read)")
    skipped_path = directory / SKIPPED
    if not skipped_path.exists():
        report.problems.append(f"{SKIPPED}: missing (the manifest counts {m.source.get('skipped')})")
    else:
        n_skipped = sum(1 for ln in skipped_path.read_text().splitlines() if ln.strip())
        if n_skipped != m.source.get("skipped"):
            report.problems.append(f"{SKIPPED}: {n_skipped} lines, manifest says "
                                   f"{m.source.get('skipped')} skipped")
    if m.source.get("written") != m.num_samples:
        report.problems.append(f"manifest: source.written={m.source.get('written')} but the shards "
                               f"hold {m.num_samples}")

    tasks = [(str(directory), s.__dict__, m.image_size, m.components, quick, where)
             for s in m.shards]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    bar = tqdm(total=len(tasks), unit="shard", desc="verifying", disable=not progress,
               file=sys.stderr)
    if workers == 1:
        results = map(_check_shard, tasks)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap(_check_shard, tasks)
    try:
        for name, checked, problems in results:
            report.samples += checked
            report.problems.extend(problems)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return report


def _verify_remote(url: str, *, workers: int, quick: bool, progress: bool,
                   cache=None) -> VerifyReport:
    """A folder in object storage. Full: every file is downloaded into the node's shard cache (as
    training would read it), the copy is verified, and the shards that pass are marked verified
    for training. Quick: the store's listing (sizes), the manifest's counts and every index
    against them; the shards' bytes are not read, so their checksums are not compared."""
    from tqdm import tqdm

    from maskdm.shardformat.remote import RemoteError, RemoteShards
    report = VerifyReport(url)
    where = f"in the bucket {url}"
    try:
        remote = RemoteShards(url, cache)
        listing = remote.listing()
        m = load_manifest(url, remote=remote)
    except (ValueError, RemoteError, DatasetError) as e:
        report.problems.append(str(e))
        return report
    names = sorted(n for n in listing if n.startswith(("shard-", "manifest", SKIPPED))
                   and not (quick and n.endswith(".tar")))
    bar = tqdm(total=sum(listing[n] for n in names), unit="B", unit_scale=True,
               desc="downloading", disable=not progress, file=sys.stderr)
    for name in names:
        try:
            remote.fetch(name, listing[name], fresh=True, wait_for_missing=False)
        except FileNotFoundError:
            report.problems.append(f"{name}: listed, then missing {where}")
        except RemoteError as e:
            report.problems.append(str(e))
        bar.update(listing[name])
    bar.close()
    if quick:
        return _quick_remote(url, m, listing, remote.dir, report)
    local = verify(remote.dir, workers=workers, quick=False, progress=progress, where=where)
    damaged = " ".join(local.problems)
    for s in m.shards:  # verified here: training need not hash them again
        if s.name not in damaged and (remote.dir / s.name).exists():
            remote.mark_verified(s.name, s.sha256)
    local.directory = url
    local.problems[:0] = report.problems
    local.warnings = [w for w in local.warnings if "SOURCE" not in w]
    return local


def _quick_remote(url, m, listing, cached: Path, report: VerifyReport) -> VerifyReport:
    from maskdm.shardformat.tarfmt import check_index
    where = f"in the bucket {url}"
    report.shards = len(m.shards)
    report.checked = ("sizes, counts and indexes in the bucket; the shards' bytes were not read, "
                      "so their checksums were not compared: run without --quick for that")
    for s in m.shards:
        if s.name not in listing:
            report.problems.append(f"{s.name}: missing {where} (listed in the manifest)")
        elif listing[s.name] != s.bytes:
            report.problems.append(f"{s.name}: {listing[s.name]} bytes {where}, the manifest "
                                   f"{s.bytes}")
        elif s.index not in listing:
            report.problems.append(f"{s.index}: missing {where}")
        else:
            try:
                check_index(cached / s.index, s.samples, s.bytes)
            except (BadIndex, OSError) as e:
                report.problems.append(f"{s.index} {where}: {e}")
    try:
        n_skipped = sum(1 for ln in (cached / SKIPPED).read_text().splitlines() if ln.strip())
        if n_skipped != m.source.get("skipped"):
            report.problems.append(f"{SKIPPED}: {n_skipped} lines, manifest says "
                                   f"{m.source.get('skipped')} skipped")
    except OSError:
        report.problems.append(f"{SKIPPED}: missing {where}")
    return report


def print_report(report: VerifyReport, quick: bool, file=None) -> None:
    file = file or sys.stdout
    for w in report.warnings:
        print(f"warning: {w}", file=file)
    if report.ok:
        what = report.checked or (f"{report.samples} samples decoded and inverted losslessly"
                                  if not quick else "checksums, counts and indexes")
        from maskdm.console import plural
        print(f"OK: {report.directory}: {plural(report.shards, 'shard')} verified ({what})",
              file=file)
    else:
        print(f"DAMAGED: {report.directory}: {len(report.problems)} problem(s):", file=file)
        for p in report.problems:
            print(f"  - {p}", file=file)
        print("Re-run `maskdm shard` with the same arguments into a new folder to rebuild it "
              "(sharding is deterministic: the good shards come out identical).", file=file)
