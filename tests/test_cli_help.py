"""What `--help` tells a user points at things that exist and names arguments as the usage does."""

import argparse
import re
from pathlib import Path

from maskdm.pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _all_parsers(parser, name="maskdm"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_config_path_in_help_exists():
    seen = 0
    for name, p in _all_parsers(build_parser()):
        for path in re.findall(r"configs/[\w./-]+\.yaml", p.format_help()):
            seen += 1
            assert (ROOT / path).exists(), f"`{name} --help` points at {path}, which does not exist"
    assert seen >= 3  # the train/demo/experiment examples


def test_help_examples_use_the_folders_the_demo_writes():
    for name, p in _all_parsers(build_parser()):
        text = p.format_help()
        assert "runs/demo/" not in text, f"`{name} --help` uses runs/demo/ (demo_output/runs/)"


def test_shard_help_lists_the_positionals_as_its_usage_names_them():
    shard = dict(_all_parsers(build_parser()))["maskdm shard"]
    listing = shard.format_help().split("positional arguments:")[1].split("options:")[0]
    assert "SRC" in listing and "OUT" in listing, listing
