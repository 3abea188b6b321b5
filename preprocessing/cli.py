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
  maskdm shard --verify shards/celebahq256

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
        usage="maskdm shard [options] SRC OUT\n       maskdm shard --verify [--quick] OUT",
        epilog=SHARD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="SRC OUT",
                   help="SRC: the source (folder, .zip, or the word 'procedural'); OUT: the "
                   "output folder. With --verify only OUT, the shard folder")
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
    p.add_argument("--overwrite", action="store_true",
                   help="discard whatever OUT holds and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_shard)


def run_shard(args) -> int:
    if args.verify:
        if len(args.paths) != 1:
            raise SystemExit("error: --verify takes one argument: the shard folder "
                             "(maskdm shard --verify OUT)")
        from maskdm.shardformat.fsutil import url_refusal
        if (refused := url_refusal(args.paths[0], "shard folder")) is not None:
            print(f"error: {refused}", file=sys.stderr)
            return 2
        from .verify import print_report, verify
        report = verify(args.paths[0], workers=args.workers, quick=args.quick,
                        progress=not args.quiet)
        print_report(report, args.quick)
        return 0 if report.ok else 1
    if len(args.paths) != 2:
        raise SystemExit("error: maskdm shard takes SRC and OUT (or --verify OUT); "
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
    if kind != "procedural" and not os.path.exists(src):
        raise SystemExit(f"error: source {src} does not exist")
    from .shard_job import ShardJobError, ShardOptions, run
    from .sources import SourceError
    opts = ShardOptions(
        src=src, out=out, source=kind, size=args.size, encoding=args.encoding,
        keep_jpeg=args.keep_jpeg, subset=args.subset, seed=args.seed, shuffle=not args.no_shuffle,
        samples_per_shard=args.samples_per_shard, workers=args.workers, count=args.count,
        gen_seed=args.gen_seed, split=args.split, bbox_csv=args.bbox_csv, small=args.small,
        min_side=args.min_side, max_pixels=args.max_pixels, jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite)
    try:
        run(opts, progress=not args.quiet)
    except (ShardJobError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a shard folder and write a preview grid",
                       description="Print the manifest summary of a shard folder and write a PNG "
                       "grid of samples reconstructed from their stored DWT tensors.")
    p.add_argument("dir", metavar="SHARDS", help="shard folder (holds manifest.json)")
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
        out = Path(args.out) if args.out else Path(args.dir) / "preview.png"
        try:
            path = write_preview(args.dir, out, n=args.n, seed=args.seed)
        except PermissionError:
            print(f"error: cannot write {out}; pass --out PATH", file=sys.stderr)
            return 1
        print(f"preview      {path} ({min(args.n, m.num_samples)} samples)")
    return 0
