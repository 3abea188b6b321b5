"""``maskdm``: the command-line entry point. Subcommands import their heavy modules lazily."""

from __future__ import annotations

import argparse
import sys

from maskdm.preprocessing.cli import add_inspect_parser, add_shard_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdm",
        description="MaskDM: masked diffusion pre-training on DWT WebDataset shards. "
        "Run `maskdm demo` for the end-to-end tour, or `maskdm COMMAND --help`.")
    # The deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is used).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from maskdm.pipeline.demo import add_parser as add_demo_parser
    add_demo_parser(sub)
    add_shard_parser(sub)
    add_inspect_parser(sub)
    _add_train(sub)
    _add_export(sub)
    _add_sync(sub)
    from maskdm.pipeline.eval.cli import add_parsers as add_eval_parsers
    add_eval_parsers(sub)
    _add_plan(sub)
    _add_bench(sub)
    _add_doctor(sub)
    from maskdm.pipeline.experiment.cli import add_parser as add_experiment_parser
    add_experiment_parser(sub)
    return parser


TRAIN_EPILOG = """\
examples:
  maskdm train --config configs/demo_pretrain.yaml
  maskdm train --config configs/paper/celebahq256_maskdm_b_pretrain.yaml --dry-run
  maskdm train --config configs/demo_pretrain.yaml --resume auto  # continue after a crash/SIGTERM
  deepspeed --num_gpus 8 $(which maskdm) train --config configs/paper/celebahq256_maskdm_b_pretrain.yaml
  deepspeed --hostfile hostfile $(which maskdm) train --config CONFIG.yaml --resume auto
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="pre-train (MSM) or fine-tune (DSM) through DeepSpeed",
                       description="Train a MaskDM model: stage pretrain (masked score matching on "
                       "the visible patches) or finetune (denoising score matching from a pretrain "
                       "checkpoint). Runs as one process or under the deepspeed launcher.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file(s); later ones override earlier ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one value, e.g. --set train.steps=100 --set optim.lr=1e-4")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the newest complete checkpoint in train.run_dir (or "
                   "start fresh if there is none); PATH: a checkpoint or run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the derived DeepSpeed config, then exit "
                   "(non-zero if the config does not fit the shards; a warning first if the "
                   "shards do not exist yet)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from maskdm.pipeline.config import ConfigError, deepspeed_config, load_config, to_yaml
    if not args.config:
        print("error: maskdm train needs --config YAML (e.g. configs/demo_pretrain.yaml, or a "
              "recipe in configs/paper/); see `maskdm train --help`", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        lacks = None
        try:
            check_optional_packages(cfg)
        except ConfigError as e:
            if not args.dry_run:
                raise
            # a login node checks a GPU config: said, not failed (the GPU nodes need it)
            lacks = f"this machine cannot train this config as it is: {e}"
        if args.dry_run:
            import json

            from maskdm.pipeline.dist import launch_world_size
            world = launch_world_size()
            data_lines, missing = _dry_run_data_check(cfg)
            if lacks:
                print(f"warning: {lacks}", file=sys.stderr)
            if missing:  # first, where it cannot be missed (and once more at the end)
                print(f"warning: {missing}", file=sys.stderr)
            print("# resolved config")
            print(to_yaml(cfg))
            print(f"# DeepSpeed config for a world of {world} (set WORLD_SIZE to see another)")
            print(json.dumps(deepspeed_config(cfg, world), indent=2))
            print("\n".join(data_lines))
            if lacks:
                print(f"warning: {lacks}", file=sys.stderr)
            if missing:
                print(f"warning: {missing}", file=sys.stderr)
            return 0
        from maskdm.pipeline.train import run_training
        summary = run_training(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return summary["exit_code"]


def check_optional_packages(cfg) -> None:
    """What the config needs that is installed separately, checked before any work (and in
    --dry-run): one line with the install command (ConfigError, exit 2)."""
    from maskdm.pipeline.config import ConfigError
    if cfg.data.backend == "dali":
        from maskdm.pipeline.data.dali_loader import dali_available
        if not dali_available():
            raise ConfigError("data.backend=dali needs NVIDIA DALI, which is not installed: "
                              "pip install 'maskdm[dali]' (CUDA 12) or 'maskdm[dali-cuda13]'; or "
                              "--set data.backend=torch")
    if cfg.model.attention == "xformers":
        try:
            import xformers.ops as _xops
            del _xops
        except ImportError:
            raise ConfigError("model.attention=xformers needs xformers, which is not installed "
                              "(or not built for this torch): pip install 'maskdm[xformers]'; or "
                              "--set model.attention=sdpa") from None


def _dry_run_data_check(cfg) -> tuple[list[str], str | None]:
    """-> (comment lines on the data and the model it implies, the warning if the shards are
    missing). A config that does not fit the shards raises ConfigError (a non-zero exit)."""
    from pathlib import Path

    from maskdm.pipeline.config import ConfigError, check_shapes
    from maskdm.shardformat.fsutil import url_refusal
    from maskdm.shardformat.manifest import DatasetError, load_manifest
    from maskdm.shardformat.remote import is_remote
    if cfg.data.shards and (refused := url_refusal(cfg.data.shards, "data.shards",
                                                    remote_ok=True)):
        raise ConfigError(refused)
    lines, missing = [], None
    shards = Path(cfg.data.shards) if cfg.data.shards else None
    if cfg.data.shards and is_remote(cfg.data.shards):  # one read of the remote manifest
        try:
            size = load_manifest(cfg.data.shards).image_size
            lines.append(f"# data: {cfg.data.shards} ({size}px; cached in "
                         f"{cfg.data.cache_dir or 'the default cache folder'})")
        except DatasetError as e:
            missing = (f"data.shards: {e}: training would stop here; the shapes below are "
                       f"checked against data.image_size={cfg.data.image_size} instead")
            size = cfg.data.image_size
    elif shards is None or not (shards / "manifest.json").exists():
        where = (f"data.shards={cfg.data.shards}" if shards is not None else "data.shards")
        state = ("is not set" if shards is None else "has no manifest.json" if shards.is_dir()
                 else "does not exist")
        missing = (f"{where} {state}: training would stop here. Create the shards with "
                   f"`maskdm shard SRC {cfg.data.shards or 'OUT'}` (or point --set data.shards= "
                   f"at existing ones); the shapes below are checked against "
                   f"data.image_size={cfg.data.image_size} instead of the data")
        size = cfg.data.image_size
    else:
        size = load_manifest(shards).image_size
        lines.append(f"# data: {shards} ({size}px)")
    if size:
        m = check_shapes(cfg, size)
        spec = cfg.mask
        lines.append(f"# model: {m.preset}, input {m.in_channels}x{m.input_size}x{m.input_size}, "
                     f"patch {m.patch_size} -> {m.num_tokens} tokens; mask {spec} keeps "
                     f"{spec.num_visible(m.grid) * m.token_groups}")
    return lines, missing


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's EMA weights to safetensors + JSON",
                       description="Write the EMA weights of a checkpoint as model.safetensors "
                       "plus a config.json describing the model (for sharing a pre-trained model "
                       "or for maskdm sample).")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder, or a run folder (newest)")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from maskdm.pipeline.checkpoint import CheckpointError
    from maskdm.pipeline.export import export_weights
    try:
        out = export_weights(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported EMA weights to {out / 'model.safetensors'} (+ config.json)")
    return 0


def _add_sync(sub) -> None:
    p = sub.add_parser("sync", help="send to MLflow what a run could not deliver during an outage",
                       description="Send the metrics a training run could not deliver to MLflow "
                       "(from RUN_DIR/metrics.jsonl, after the last line MLflow received) and "
                       "its final status, e.g. after the tracking server was down at the end of "
                       "the run. Safe to repeat: a metric point sent twice is stored once.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (train.run_dir)")
    p.add_argument("--uri", default=None,
                   help="tracking URI, if the server moved (default: the run's, from "
                   "RUN_DIR/mlflow.json)")
    p.set_defaults(func=_run_sync)


def _run_sync(args) -> int:
    from maskdm.pipeline.tracking import TrackingError, reason, sync
    try:
        return sync(args.run_dir, args.uri)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the server is still down: say so, no traceback
        print(f"error: MLflow could not be reached ({reason(e, 300)}); try again when it is back",
              file=sys.stderr)
        return 1


DOCTOR_EPILOG = """\
examples:
  maskdm doctor                                   # this machine, for training in general
  maskdm doctor --config configs/paper/celebahq256_maskdm_b_pretrain.yaml \\
      --set data.shards=s3://my-bucket/shards/celebahq256        # what this job needs
  maskdm doctor --run                             # + a short real job on this machine
  srun --ntasks-per-node=1 maskdm doctor --config CONFIG.yaml --json   # every node of a job
"""


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check that this machine (or node) can run the job",
                       description="One line per check (OK / WARN / FAIL, and the fix for "
                       "every non-OK line): Python, torch and CUDA, GPUs and bf16, NCCL/gloo, "
                       "DeepSpeed, DALI, xformers, CPU cores; with --config also the config's "
                       "shards (one shard read and checked), the MLflow server (and its "
                       "artifact store) and the disks for checkpoints and the shard cache. With "
                       "--config, FAIL only on what that config needs. Exit code 1 on any FAIL.",
                       epilog=DOCTOR_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="a training config (as for maskdm train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one value, as for maskdm train")
    p.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    p.add_argument("--run", action="store_true",
                   help="then run a short real job here: shard, train ~30 steps per combination "
                   "(loader, attention, precision, compile), resume, sample, score")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="with --run: train with N ranks (torchrun)")
    p.add_argument("--full", action="store_true",
                   help="with --run on a CPU: also bf16 and torch.compile (slow there)")
    p.add_argument("--keep", action="store_true", help="with --run: keep its temporary folder")
    p.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    from maskdm.pipeline.config import ConfigError, load_config

    from . import doctor
    cfg = None
    if args.config:
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.overrides:
        print("error: --set needs --config", file=sys.stderr)
        return 2
    checks = doctor.check_machine(cfg)
    if cfg is not None:
        checks += doctor.check_config(cfg)
    code = doctor.report(checks, as_json=args.json)
    if args.run:
        from . import doctor_run
        print(f"\nmaskdm doctor --run ({args.nproc} rank(s)):", flush=True)
        code = max(code, doctor_run.run(args.nproc, args.full, args.keep,
                                        log=lambda m: print(m, flush=True)))
    return code


def _add_plan(sub) -> None:
    from maskdm.pipeline.data import plan  # light: numpy only
    p = sub.add_parser("plan", help="what the data order asks of each node: downloads per "
                       "epoch, cache, link rate, batch mixing (no training)",
                       description=plan.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_arguments(p)
    p.set_defaults(func=plan.run)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks (data loading, the training loop)",
                       description="Throughput benchmarks that print a table. Bare model-step "
                       "benchmarks: python -m benchmarks.train_step (see benchmarks/).")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    d = bsub.add_parser("data", help="loader images/s, MB/s and CPU cores per backend",
                        description="Measure how fast the loaders deliver ready batches.")
    from maskdm.pipeline.data import bench as data_bench  # light: torch is imported when it runs
    data_bench.add_arguments(d)
    d.set_defaults(func=lambda a: data_bench.run(a))
    from maskdm.pipeline import bench_train  # light: torch is imported when it runs
    t = bsub.add_parser("train", help="the real training loop's img/s against the bare step, "
                        "with the difference broken down", description=bench_train.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_train.add_arguments(t)
    t.set_defaults(func=lambda a: bench_train.run(a))
    p.set_defaults(func=lambda a: p.print_help() or 2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from maskdm.shardformat.fsutil import RedactingStream
    for name in ("stdout", "stderr"):  # no credential inside a URL reaches the console
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    from maskdm.shardformat.patience import CacheFull
    try:
        code = int(args.func(args) or 0)
    except CacheFull as e:  # a download did not fit on its disk: the message names the folder
        print(f"error: {e}", file=sys.stderr)
        code = 5
    except BaseException:
        _end_process_groups(None)  # (the traceback is printed as usual)
        raise
    _end_process_groups(code)  # a rank of a multi-rank command does not return from here
    return code


def _end_process_groups(code: int | None) -> None:
    """A command that joined a torch.distributed world (train, sample, bench on several ranks)
    leaves it before Python finalises: a gloo worker thread still releasing the last collective
    while the interpreter shuts down aborts the process ("terminate called without an active
    exception"), turning a finished run into a failed one. Destroying the group first took a
    script ending right after an all-reduce from 5 aborts in 30 runs to 0 in 30, but the 2-rank
    ZeRO-3 training run of the world-size test still aborted (once in CI, once in 4 runs here:
    DeepSpeed keeps references to its groups, whose threads outlive the destruction). So a rank of a multi-rank command that finished
    (``code`` given) flushes its output and ends the process at once (``os._exit``): everything
    it wrote is closed by then (checkpoints, uploads, MLflow), and no finalising interpreter is
    left for a worker thread to meet."""
    if "torch.distributed" not in sys.modules:  # nothing imported it: nothing to end
        return
    from maskdm.pipeline import dist
    several = dist.world_size() > 1
    dist.destroy()
    if code is None or not several:
        return
    import logging
    import os
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
