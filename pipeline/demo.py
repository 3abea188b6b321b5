"""``maskdm demo``: the whole pipeline on the built-in procedural face set, on one CPU.

procedural images -> DWT shards -> MSM pre-training (block mask) -> DSM fine-tuning -> sample grid,
with both runs in one MLflow experiment. Each stage is the real command a user would run (shown
as it starts); re-running the demo resumes whatever is unfinished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from maskdm.console import show_progress

REPO = Path(__file__).resolve().parents[1]
HELDOUT = 256  # held-out procedural faces (a second image set) the samples are scored against


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the built-in procedural set (CPU, ~7 min)",
                       description="Shard the built-in procedural face set, pre-train with masked "
                       "score matching, fine-tune with denoising score matching, sample a grid, "
                       "and track both runs in MLflow. Re-running resumes unfinished stages.")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--count", type=int, default=4000, help="procedural images (default 4000)")
    p.add_argument("--quick", action="store_true",
                   help="a one-minute smoke run (few steps; the samples will not look like faces)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first")
    p.set_defaults(func=run)


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def _train(config: Path, sets: list[str], log: Path) -> None:
    from .launch import run_maskdm
    shown = "maskdm train --config " + str(config.relative_to(REPO)) + " " + \
        " ".join(f"--set {s}" for s in sets) + " --resume auto"
    print(f"$ {shown}", flush=True)
    code = run_maskdm(["train", "--config", str(config), "--resume", "auto",
                       *[a for s in sets for a in ("--set", s)]], log)
    if code == 2:  # refused before training (the reason is the line above), e.g. resuming a
        # run that another maskdm version made with other settings
        raise SystemExit(f"error: the training stage refused to start (see above; log {log}). If "
                         f"this demo folder was made by another maskdm version, `maskdm demo "
                         f"--fresh` starts over.")
    if code != 0:
        raise SystemExit(f"error: the training stage failed (exit {code}); its log is {log}. "
                         f"Re-run `maskdm demo` to resume it.")


def run(args) -> int:
    from .tracking import default_uri, read_record

    configs = REPO / "configs"
    if not (configs / "demo_pretrain.yaml").exists():
        print(f"error: {configs}/demo_pretrain.yaml is missing; run the demo from a source checkout "
              f"installed with `pip install -e .`", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    count = 512 if args.quick else args.count
    print(f"maskdm demo -> {out}\n  1. shard {count} procedural face images (32x32)\n"
          f"  2. pre-train a tiny U-ViT with masked score matching (90% of the 4x4-pixel patches "
          f"hidden)\n"
          f"  3. fine-tune it with denoising score matching\n  4. sample 64 images (DDIM); both runs go to "
          f"MLflow experiment 'maskdm-demo'\nexpected time: {'~1-2 min' if args.quick else '~7 min on 2 CPU cores'}")
    _shard_stage(out, count)
    runs = out / "runs"
    _train_stages(configs, out, runs, args.quick)
    n_steps = "10" if args.quick else "100"
    last = _sample_stage(out, runs, n_steps)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri(runs / "finetune")[0]
    print(f"\nsamples (EMA weights, DDIM {n_steps} steps, eta 1): {out / 'samples.png'} "
          f"(PNGs in {out / 'samples'})\n"
          f"real data for comparison:          {out / 'data.png'}\n"
          f"fine-tuned checkpoint:             {last}\n"
          f"exported model:                    {runs / 'finetune' / 'export'}\n"
          f"total {time.time() - t_all:.0f}s\n")
    print(_where_to_click(uri, (read_record(runs / "finetune") or {}).get("experiment_id")))
    return 0


def _where_to_click(uri: str, experiment_id: str | None) -> str:
    from .tracking import runs_url, ui_server_command
    server = ui_server_command(uri)
    base = "http://127.0.0.1:5000" if server else uri
    start = f"start the UI:\n  {server}\nthen open" if server else "open"
    return (f"MLflow: both runs are in experiment 'maskdm-demo'; {start}\n"
            f"  runs:   {runs_url(base, experiment_id)}\n"
            f"  charts: {runs_url(base, experiment_id, charts=True)}\n"
            f"The fine-tune run is nested under the pre-training run (the + beside it in the runs "
            f"table); a run's page has its parameters, its \"System metrics\" and its sample "
            f"grids under Artifacts; the exported models are under \"Models\".")


def _shard_stage(out: Path, count: int) -> None:
    from maskdm.preprocessing.preview import write_preview
    from maskdm.preprocessing.shard_job import ShardOptions
    from maskdm.preprocessing.shard_job import run as shard
    t0 = _stage("1/4 shard the procedural set")
    print(f"$ maskdm shard procedural {out / 'shards'} --size 32 --count {count}", flush=True)
    m = shard(ShardOptions(src="procedural", out=str(out / "shards"), source="procedural", size=32,
                           count=count, samples_per_shard=1000), progress=show_progress())
    write_preview(out / "shards", out / "data.png", n=64)
    print(f"  {m.num_samples} samples; real images for comparison: {out / 'data.png'} "
          f"({time.time() - t0:.0f}s)")
    print(f"$ maskdm shard procedural {out / 'heldout'} --size 32 --count {HELDOUT} --gen-seed 1"
          f"   # held-out faces, for scoring", flush=True)
    shard(ShardOptions(src="procedural", out=str(out / "heldout"), source="procedural", size=32,
                       count=HELDOUT, gen_seed=1, samples_per_shard=1000),
          progress=show_progress())


def _train_stages(configs: Path, out: Path, runs: Path, quick: bool) -> None:
    steps = ["train.steps=20", "train.ckpt_every=10", "train.log_every=10", "train.sample_every=0",
             "eval.steps=10"] if quick else []
    common = [f"data.shards={out / 'shards'}"] + steps
    t0 = _stage("2/4 pre-train (MSM: loss on the visible patches only)")
    _train(configs / "demo_pretrain.yaml", common + [f"train.run_dir={runs / 'pretrain'}"],
           out / "pretrain.log")
    print(f"  ({time.time() - t0:.0f}s)")
    t0 = _stage("3/4 fine-tune (DSM, from the pre-trained EMA weights)")
    _train(configs / "demo_finetune.yaml", common + [f"train.run_dir={runs / 'finetune'}",
                                                     f"train.init_from={runs / 'pretrain'}"],
           out / "finetune.log")
    print(f"  ({time.time() - t0:.0f}s)")


def _sample_stage(out: Path, runs: Path, n_steps: str) -> Path:
    """-> the fine-tuned checkpoint the samples come from."""
    from .checkpoint import complete_checkpoints
    t0 = _stage("4/4 sample 64 images with DDIM from the fine-tuned EMA weights")
    last = complete_checkpoints(runs / "finetune" / "checkpoints")[-1]
    cmd = ["sample", "--ckpt", str(runs / "finetune"), "--num-images", "64", "--sampler", "ddim",
           "--steps", n_steps, "--eta", "1", "--out", str(out / "samples")]
    print("$ maskdm " + " ".join(cmd), flush=True)
    r = subprocess.run([sys.executable, "-m", "maskdm", *cmd], cwd=os.getcwd(),
                       env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(r.stdout, file=sys.stderr)
        raise SystemExit(f"error: sampling failed (exit {r.returncode}); re-run `maskdm demo`")
    lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("DeepSpeed ")]
    if lines:
        print("  " + lines[-1])
    _grid(out / "samples", out / "samples.png")
    _score(out)
    print(f"  ({time.time() - t0:.0f}s)")
    return last


def _score(out: Path) -> None:
    """SWD of the samples to held-out faces, next to the SWD of as many training faces to the
    same held-out faces: how far the model is from the best it could do at this N."""
    from .eval.score import load_images
    from .eval.swd import swd_scores
    samples = load_images(out / "samples")
    n = len(samples)
    held = load_images(out / "heldout", n)
    model = swd_scores(samples, held)
    floor = swd_scores(load_images(out / "shards", n), held)
    print(f"  $ maskdm score --samples {out / 'samples'} --ref {out / 'heldout'}\n"
          f"  SWD x1e3 to {n} held-out faces (lower is better): samples {model['swd_patch']:.1f} "
          f"on 7x7 patches, {model['swd_image']:.1f} on whole images; {n} real training faces "
          f"score {floor['swd_patch']:.1f} and {floor['swd_image']:.1f}")


def _grid(folder: Path, png: Path) -> None:
    import numpy as np
    from PIL import Image

    from .eval.images import grid
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    g = grid(imgs)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="maskdm")
    add_parser(ap.add_subparsers())
    args = ap.parse_args(["demo", *(argv or [])])
    return args.func(args)
