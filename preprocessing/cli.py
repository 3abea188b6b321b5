"""Command-line front ends of preprocessing: ``maskdm shard`` and ``maskdm inspect``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SHARD_EPILOG = """\
examples:
  maskdm shard /data/CelebA-HQ-img shards/celebahq256 --source celebahq
  maskdm shard /data/CelebAMask-HQ.zip shards/celebahq256 --source celebahq --keep-jpeg
  maskdm shard /data/vggface2 shards/vgg256 --source vggface2 --bbox-csv loose_bb_train.csv
  maskdm shard /data/CelebA-HQ-img shards/celebahq256-10pct --source celebahq --subset 0.1 --seed 0
  maskdm shard procedural shards/demo --size 32 --count 4000
  maskdm shard /data/CelebA-HQ-img s3://bucket/shards/celebahq256 --source celebahq
  maskdm shard /data/vggface2 s3://bucket/vgg256 --source vggface2 --part 3/16
  maskdm shard --merge s3://bucket/vgg256
  maskdm shard --verify shards/celebahq256

OUT may be an s3:// or gs:// URL: each shard is written to a local staging folder (--stage),
uploaded and deleted there; the manifest is uploaded last. Credentials come from the store's usual
environment.

Many machines: --part I/N (0 <= I < N) writes the I-th of N parts of the same job into the same
OUT (a shared folder or a bucket); any N gives exactly the shards of one job, the last part to
finish writes the manifest, and `maskdm shard --merge OUT` does so for a job whose parts are done:
  sbatch --array=0-15 --wrap 'maskdm shard /data/vgg s3://b/vgg256 --part $SLURM_ARRAY_TASK_ID/16'

A killed or interrupted run resumes when re-run with the same arguments. Bad images never stop the
job: each is skipped and listed with its reason in OUT/skipped.jsonl. Images smaller than --size
are upscaled (Lanczos) unless their crop is under --min-side pixels or --small skip is given.
"""


def add_shard_parser(sub) -> None:
    p = sub.add_parser(
        "shard", help="turn an image folder/zip (or the procedural set) into DWT WebDataset shards",
        description="Turn CelebA-HQ, VGGFace2, any image folder, or the built-in procedural set "
        "into WebDataset tar shards of lossless float16 Haar-DWT tensors, with a manifest, DALI "
        "index files and skipped.jsonl. With --verify, check an existing shard directory.",
        usage="maskdm shard [options] SRC OUT\n       maskdm shard --verify [--quick] OUT\n"
              "       maskdm shard --merge OUT",
        epilog=SHARD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="SRC OUT",
                   help="SRC: the source (folder, .zip, or the word 'procedural'; a folder or "
                   ".zip may be an s3:// / gs:// / http(s):// URL); OUT: the output folder (or "
                   "s3:// / gs:// prefix). With --verify or --merge only OUT, the shard folder")
    p.add_argument("--verify", action="store_true",
                   help="check checksums, counts, indexes and lossless decoding of a shard folder")
    p.add_argument("--quick", action="store_true",
                   help="with --verify: checksums, counts and indexes only (no decoding)")
    p.add_argument("--source", default="auto",
                   choices=["auto", "celebahq", "vggface2", "folder", "procedural"],
                   help="source kind (default: auto = 'procedural' for SRC=procedural, celebahq "
                   "for a .zip, folder otherwise)")
    p.add_argument("--size", type=int, default=256, help="output side in pixels, a multiple of 2 "
                   "(default 256)")
    p.add_argument("--encoding", choices=["dwt16", "jpeg"], default="dwt16",
                   help="dwt16: lossless float16 Haar tensors (default); jpeg: compact JPEG only, "
                   "the DWT is computed by the loader on the GPU")
    p.add_argument("--keep-jpeg", action="store_true",
                   help="also store the resized image as JPEG (previews, FID reference stats)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default 95, 4:4:4)")
    p.add_argument("--subset", type=float, default=None, metavar="FRACTION",
                   help="keep a deterministic random fraction of the inputs (e.g. 0.01, 0.1); "
                   "with the same --seed, smaller subsets are inside larger ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the shuffle "
                   "(default 0)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep the sorted input order in the shards (default: shuffle, so each "
                   "shard is an i.i.d. sample, which the loader's bounded shuffle relies on)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="default 1000")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: all usable cores)")
    p.add_argument("--count", type=int, default=2048, help="procedural: number of images "
                   "(default 2048)")
    p.add_argument("--gen-seed", type=int, default=0, help="procedural: which image set (default 0)")
    p.add_argument("--split", default="train", help="vggface2: split folder (default train)")
    p.add_argument("--bbox-csv", default=None,
                   help="vggface2: loose face boxes CSV (NAME_ID,X,Y,W,H); default: center crop")
    p.add_argument("--small", choices=["upscale", "skip"], default="upscale",
                   help="images whose square crop is smaller than --size (default upscale)")
    p.add_argument("--min-side", type=int, default=32,
                   help="never upscale crops smaller than this many pixels; skip them (default 32)")
    p.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="skip images with more pixels than this (decompression-bomb guard; "
                   "default 64,000,000)")
    p.add_argument("--max-file-mb", type=int, default=256, metavar="MB",
                   help="skip source files (and zip members) larger than this before reading "
                   "them (default 256)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard whatever OUT holds and start over")
    p.add_argument("--stage", default=None, metavar="DIR",
                   help="OUT in object storage (s3://, gs://): the local folder each shard is "
                   "written to before its upload (it holds at most 2 x workers shards; default "
                   "~/.cache/maskdm/staging/NAME-HASH[-part-I-of-N], or under $MASKDM_CACHE's "
                   "parent)")
    p.add_argument("--keep-stage", action="store_true",
                   help="keep every staged shard after its upload (the stage then needs the "
                   "dataset's size; default: each is deleted once uploaded)")
    p.add_argument("--lease-s", type=float, default=90.0, metavar="SECONDS",
                   help="OUT in object storage: one job writes a prefix; a job finding another "
                   "job's lease there watches it this long: renewed -> refused, unchanged (that "
                   "job died) -> taken over (default 90)")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="write only part I of N (0 <= I < N) of the job's shards, e.g. one task "
                   "of a Slurm array (--part $SLURM_ARRAY_TASK_ID/N); parts may run at the same "
                   "time on other machines into the same OUT, together they write exactly the "
                   "shards one job would, and the last to finish writes the manifest")
    p.add_argument("--merge", action="store_true",
                   help="maskdm shard --merge OUT: write the manifest of a job whose parts are "
                   "all done (the last part does it already; this is for checking, and safe to "
                   "repeat)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_shard)


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"error: --part takes I/N (e.g. 0/4 for the first of 4 parts), got "
                         f"{text!r}") from None
    return i, n


def run_shard(args) -> int:
    if args.verify:
        if len(args.paths) != 1:
            raise SystemExit("error: --verify takes one argument: the shard folder "
                             "(maskdm shard --verify OUT)")
        from maskdm.shardformat.fsutil import url_refusal
        if (refused := url_refusal(args.paths[0], "shard folder", remote_ok=True)) is not None:
            print(f"error: {refused}", file=sys.stderr)
            return 2
        from .verify import print_report, verify
        report = verify(args.paths[0], workers=args.workers, quick=args.quick,
                        progress=not args.quiet)
        print_report(report, args.quick)
        return 0 if report.ok else 1
    if args.merge:
        return _run_merge(args)
    if len(args.paths) != 2:
        raise SystemExit("error: maskdm shard takes SRC and OUT (or --verify OUT, --merge OUT); "
                         "see `maskdm shard --help`")
    src, out = args.paths
    kind = args.source
    if kind == "auto":
        if src == "procedural":
            kind = "procedural"
        elif src.lower().endswith(".zip"):
            kind = "celebahq"
        else:
            kind = "folder"
    from maskdm.shardformat.fsutil import url_refusal
    from maskdm.shardformat.remote import is_remote
    if (refused := url_refusal(src, "SRC", remote_ok=True)) is not None:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    if kind != "procedural" and not is_remote(src) and not os.path.exists(src):
        print(f"error: source {src} does not exist", file=sys.stderr)
        return 2

    from .shard_job import ShardDiskFull, ShardJobError, ShardOptions, run
    from .sources import SourceError
    remote_out = is_remote(out) and url_refusal(out, "OUT", remote_ok=True) is None
    if args.lease_s <= 0:
        raise SystemExit("error: --lease-s must be > 0 seconds")
    if args.max_file_mb < 1:
        raise SystemExit("error: --max-file-mb must be >= 1")
    if (args.stage or args.keep_stage) and not remote_out:
        raise SystemExit("error: --stage and --keep-stage apply when OUT is an s3:// or gs:// URL")
    opts = ShardOptions(
        src=src, out=out, source=kind, size=args.size, encoding=args.encoding,
        keep_jpeg=args.keep_jpeg, subset=args.subset, seed=args.seed, shuffle=not args.no_shuffle,
        samples_per_shard=args.samples_per_shard, workers=args.workers, count=args.count,
        gen_seed=args.gen_seed, split=args.split, bbox_csv=args.bbox_csv, small=args.small,
        min_side=args.min_side, max_pixels=args.max_pixels, jpeg_quality=args.jpeg_quality,
        max_file_mb=args.max_file_mb,
        overwrite=args.overwrite, part=parse_part(args.part))
    try:
        if remote_out:
            from .upload import run_remote
            run_remote(opts, out, stage=args.stage, keep_stage=args.keep_stage,
                       progress=not args.quiet, lease_s=args.lease_s)
        else:
            run(opts, progress=not args.quiet)
    except ShardDiskFull as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    except (ShardJobError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _run_merge(args) -> int:
    if len(args.paths) != 1:
        raise SystemExit("error: --merge takes one argument: the shard folder of the parts "
                         "(maskdm shard --merge OUT)")
    from maskdm.shardformat.fsutil import url_refusal
    from maskdm.shardformat.remote import is_remote

    from .shard_job import ShardJobError, merge
    out = args.paths[0]
    if (refused := url_refusal(out, "OUT", remote_ok=True)) is not None:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    try:
        if is_remote(out):
            from .upload import merge_remote
            m = merge_remote(out, stage=args.stage)
        else:
            m = merge(out)
    except ShardJobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: complete, {m.num_samples} samples in {len(m.shards)} shards; "
          f"`maskdm shard --verify {out}` checks them")
    return 0


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a shard folder and write a preview grid",
                       description="Print the manifest summary of a shard folder and write a PNG "
                       "grid of samples reconstructed from their stored DWT tensors.")
    p.add_argument("dir", metavar="SHARDS", help="shard folder (holds manifest.json), or an "
                   "s3:// / gs:// / http(s):// URL of one (the preview is then written to "
                   "NAME-preview.png here)")
    p.add_argument("-n", type=int, default=16, help="samples in the preview (default 16)")
    p.add_argument("--seed", type=int, default=None,
                   help="pick samples at random with this seed (default: the first ones)")
    p.add_argument("--out", default=None, help="preview PNG path (default SHARDS/preview.png)")
    p.add_argument("--no-preview", action="store_true", help="summary only")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from maskdm.shardformat.manifest import DatasetError, load_manifest

    from .preview import summary, write_preview
    try:
        m = load_manifest(args.dir)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(m, args.dir))
    if not args.no_preview:
        from maskdm.shardformat.remote import is_remote
        if args.out:
            out = Path(args.out)
        elif is_remote(args.dir):  # never write into the bucket: next to the user
            out = Path(f"{args.dir.rstrip('/').rsplit('/', 1)[-1]}-preview.png")
        else:
            out = Path(args.dir) / "preview.png"
        try:
            path = write_preview(args.dir, out, n=args.n, seed=args.seed)
        except PermissionError:
            print(f"error: cannot write {out}; pass --out PATH", file=sys.stderr)
            return 1
        print(f"preview      {path} ({min(args.n, m.num_samples)} samples)")
    return 0
