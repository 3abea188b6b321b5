"""``maskdm``: the command-line entry point. Subcommands import their heavy modules lazily."""

from __future__ import annotations

import argparse
import sys

from preprocessing.cli import add_inspect_parser, add_shard_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdm",
        description="MaskDM: masked diffusion pre-training on DWT WebDataset shards. "
        "Run `maskdm demo` for the end-to-end tour, or `maskdm COMMAND --help`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_shard_parser(sub)
    add_inspect_parser(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks (data loading)",
                       description="Throughput benchmarks that print a table. Model benchmarks: "
                       "python -m benchmarks.train_step (see benchmarks/).")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    d = bsub.add_parser("data", help="loader images/s, MB/s and CPU cores per backend",
                        description="Measure how fast the loaders deliver ready batches.")
    from pipeline.data import bench as data_bench  # light: torch is imported when it runs
    data_bench.add_arguments(d)
    d.set_defaults(func=lambda a: data_bench.run(a))
    p.set_defaults(func=lambda a: p.print_help() or 2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
