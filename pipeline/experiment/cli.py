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
  maskdm experiment fast-learner --config configs/experiments/fast_learner_cpu.yaml \\
      --seeds 0,1,2 --arms scratch,block50,steps_block50     # a third seed for three arms
  maskdm experiment fast-learner --config configs/experiments/fast_learner_cpu.yaml --report
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
    f.add_argument("--switch", type=float, default=None,
                   help="fraction of each arm's FLOPs spent on MSM pre-training (default: the "
                   "file's switch)")
    f.add_argument("--budget-steps", type=int, default=None,
                   help="the FLOP budget, in DSM-from-scratch steps (default: the file's)")
    f.add_argument("--seeds", default=None, metavar="0,1",
                   help="comma-separated seeds (default: the file's)")
    f.add_argument("--arms", default=None, metavar="A,B",
                   help="train only these arms (comma-separated names from the file, run in "
                   "the file's order); the finished runs of the others still count in the "
                   "results")
    f.add_argument("--report", action="store_true",
                   help="train nothing: write the results of the runs finished so far (e.g. "
                   "while the experiment runs, or when some seeds of an arm are missing)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="training override for every run, e.g. --set train.device=cuda")
    f.set_defaults(func=_run_fast_learner)

    t = esub.add_parser(
        "toy", help="the paper's toy: Swiss roll (2-D, S=1) and rose (3-D, S=2), MSM -> DSM vs "
        "DSM at equal FLOPs",
        description="Each coordinate of a point is a token of maskdm's U-ViT; MSM with S visible "
        "coordinates learns the S-dimensional marginals, then DSM fine-tunes. Compared with DSM "
        "from scratch at equal training FLOPs by the SWD between generated and held-out points "
        "and the mean distance of generated points to the curve. Writes OUT/toy.png (proxy "
        "density, samples, SWD vs FLOPs), OUT/toy_results.json and OUT/toy_results.md.")
    t.add_argument("--shape", choices=("swissroll", "rose", "both"), default="both")
    t.add_argument("--out", default="experiments/toy", metavar="DIR",
                   help="output folder (default experiments/toy)")
    t.add_argument("--steps", type=int, default=None,
                   help="DSM-from-scratch budget in steps (default 3000): every arm gets its FLOPs")
    t.add_argument("--switch", type=float, default=None,
                   help="fraction of the FLOPs spent on MSM pre-training (default 0.5)")
    t.add_argument("--seeds", default=None, metavar="0,1",
                   help="comma-separated seeds (default 0,1)")
    t.add_argument("--quick", action="store_true", help="seconds-long check of the mechanics")
    t.set_defaults(func=_run_toy)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _run_fast_learner(args) -> int:
    from ..config import ConfigError
    from .fast_learner import ExperimentError, Spec, run
    try:
        spec = Spec.load(args.config)
        if args.switch is not None:
            spec.switch = args.switch
        if args.budget_steps is not None:
            spec.budget_steps = args.budget_steps
        if args.seeds:
            try:
                spec.seeds = [int(x) for x in args.seeds.split(",")]
            except ValueError:
                raise ConfigError(f"--seeds: expected comma-separated integers, got "
                                  f"{args.seeds!r}") from None
        spec.check(args.config)
        out = Path(args.out or f"experiments/{spec.name}{'-quick' if args.quick else ''}")
        only = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        run(spec, out, quick=args.quick, extra_sets=args.overrides, only=only,
            report=args.report)
    except (ConfigError, ExperimentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_toy(args) -> int:
    from dataclasses import replace
    from functools import partial

    from .toy import ToySettings, run
    s = ToySettings()
    try:
        if args.steps is not None:
            if args.steps < 2:
                raise ValueError("--steps must be >= 2")
            s = replace(s, steps=args.steps)
        if args.switch is not None:
            if not 0 < args.switch < 1:
                raise ValueError("--switch must be in (0, 1)")
            s = replace(s, switch=args.switch)
        if args.seeds:
            s = replace(s, seeds=[int(x) for x in args.seeds.split(",")])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = ["swissroll", "rose"] if args.shape == "both" else [args.shape]
    # flushed lines: a run piped into a log file shows each seed and arm as it finishes
    run(shapes, s, Path(args.out), quick=args.quick, log=partial(print, flush=True))
    return 0
