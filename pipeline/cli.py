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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
