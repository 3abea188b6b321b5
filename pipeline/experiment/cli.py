"""``maskdm experiment``: the command-line front end of the experiments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAST_EPILOG = """\
examples:
  maskdm experiment fast-learner --config configs/experiments/fast_learner_cpu.yaml
  maskdm experiment fast-learner --config configs/experiments/fast_learner_cpu.yaml --quick
  maskdm experiment fast-learner --config configs/experiments/fast_learner_gpu64.yaml \\
      --out experiments/gpu64 --set train.device=cuda
re-running the same command continues an interrupted experiment.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="measured comparisons: MSM pre-training vs DSM from "
                       "scratch at equal FLOPs; the paper's 2-D/3-D toy",
                       description="Experiments that measure what masked pre-training buys.")
    esub = p.add_subparsers(dest="experiment", metavar="WHICH")
    f = esub.add_parser(
        "fast-learner", help="DSM from scratch vs MSM -> DSM at equal cumulative training FLOPs",
        description="Run every arm of an experiment file as ordinary `maskdm train` runs with the "
        "same budget of training FLOPs (pre-training included), score them with the weight-free "
        "metrics against a held-out set, and write OUT/results.json, OUT/results.md and "
        "OUT/curves.png (metrics against FLOPs). SWD and the held-out loss are relative "
        "measures for comparing these arms; they are not comparable with published FID.",
        epilog=FAST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--config", required=True, metavar="YAML",
                   help="experiment file (see configs/experiments/)")
    f.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default experiments/NAME, or experiments/NAME-quick)")
    f.add_argument("--quick", action="store_true",
                   help="a few-minute check of the mechanics (tiny budget, one seed, few "
                   "samples): the numbers mean nothing")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="training override for every run, e.g. --set train.device=cuda")
    f.set_defaults(func=_run_fast_learner)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _run_fast_learner(args) -> int:
    from ..config import ConfigError
    from .fast_learner import ExperimentError, Spec, run
    try:
        spec = Spec.load(args.config)
        out = Path(args.out or f"experiments/{spec.name}{'-quick' if args.quick else ''}")
        run(spec, out, quick=args.quick, extra_sets=args.overrides)
    except (ConfigError, ExperimentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
