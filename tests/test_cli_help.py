"""What `--help` tells a user points at things that exist and names arguments as the usage does."""

import argparse
import re
import sys
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


def test_usage_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """No config for `maskdm train`; a recipe that needs DALI where DALI is missing (the import
    fails for real: the module is masked in sys.modules); a shard source that does not exist."""
    from maskdm.pipeline.cli import main
    assert main(["train"]) == 2
    assert "maskdm train needs --config YAML" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    cfg = str(ROOT / "configs" / "test_tiny.yaml")
    for argv in (["train", "--config", cfg, "--set", "data.backend=dali",
                  "--set", f"train.run_dir={tmp_path / 'r'}"],
                 ["bench", "data", str(tmp_path), "--backends", "dali"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs NVIDIA DALI, which is not installed" in err[0], err
    assert not (tmp_path / "r").exists()  # nothing was started
    # --dry-run on a login node without DALI checks a GPU recipe: it says what this machine
    # lacks, and still prints the config (issue 36, item 11)
    assert main(["train", "--config", cfg, "--set", "data.backend=dali", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "# resolved config" in out.out
    assert "warning: this machine cannot train this config as it is: data.backend=dali needs " \
        "NVIDIA DALI, which is not installed" in out.err
    assert main(["shard", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
