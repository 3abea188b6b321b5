"""``maskdm bench train``: what the real training loop delivers against the bare step, and where the
difference goes.

One process (or one per rank under a launcher) builds the real ``Trainer`` from a config (loader,
DeepSpeed engine, EMA, MLflow tracking into a temporary store) and times, after ``--warmup`` steps:

1. **end to end**: ``--steps`` steps of the unmodified loop (no extra synchronisation);
2. **breakdown**: ``--steps`` more steps with each part timed (on CUDA with a device sync around
   each part, so the parts add up; that pass is slower, which is why it is separate): data wait,
   randomness (timesteps, noise, masks), forward + loss, backward, optimizer step, EMA update,
   metric points and console lines, and the rest (the loop itself);
3. **bare step**: forward, backward and optimizer step of the same engine on one batch already on
   the device, with the same masks: the ceiling the loop is measured against;
4. **checkpoint**: one checkpoint, its time amortised over the config's ``train.ckpt_every``.

Sample grids and training-time FID/SWD are evaluation, not training throughput: they are switched
off here. The end-to-end rate includes the amortised checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PARTS = (("data", "data wait (loader)"), ("randomness", "randomness (t, noise, masks)"),
         ("forward", "forward + loss"), ("backward", "backward"),
         ("optimizer", "optimizer step (DeepSpeed)"), ("ema", "EMA update"),
         ("logging", "metric points + console lines"), ("checkpoint", "checkpoint (amortised)"),
         ("other", "other (the loop, Python)"))


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device) -> float:
    """Measured dense matmul rate in FLOP/s (bf16 8192^3 on CUDA, fp32 2048^3 on CPU): the MFU
    denominator."""
    import torch
    n, dtype, reps = ((8192, torch.bfloat16, 10) if device.type == "cuda"
                      else (2048, torch.float32, 3))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


class Sections:
    """Wraps callables so their time adds up per named part (with a device sync on CUDA)."""

    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] += time.perf_counter() - t0
        return timed


class _TimedLoader:
    """The trainer's loader with ``next()`` timed; everything else passes through."""

    def __init__(self, loader, sections: Sections):
        self._loader, self._next = loader, sections.wrap("data", loader.__next__)

    def __next__(self):
        return self._next()

    def __getattr__(self, name):
        return getattr(self._loader, name)


def measure(config: list[str], sets: list[str], steps: int, warmup: int) -> dict:
    """Run the three timings on this process's rank; -> the row (rank 0's view)."""
    import torch
    from tqdm import tqdm

    from . import dist
    from . import train as train_mod
    from .config import load_config
    with tempfile.TemporaryDirectory(prefix="maskdm-bench-") as tmp:
        base = load_config(config, sets)
        ckpt_every = base.train.ckpt_every
        cfg = load_config(config, [*sets, f"train.run_dir={Path(tmp) / 'run'}",
                                   f"train.steps={warmup + 2 * steps}", "train.sample_every=0",
                                   "eval.fid_every=0", "eval.score_every=0",
                                   f"train.ckpt_every={10 ** 9}", "tracking.enabled=true",
                                   "tracking.uri=sqlite:///" + str(Path(tmp) / "mlflow.db"),
                                   "tracking.experiment=maskdm-bench"])
        tr = train_mod.Trainer(cfg)
        tr._build()
        tr._start_tracking()
        tr.bar = tqdm(disable=True)
        tr.log = lambda *a, **k: None  # console lines still cost their formatting, not output
        save, tr._save = tr._save, lambda: None  # the loop saves at its last step: timed apart
        device, t = tr.device, tr.t
        batch = t.global_batch

        sections = Sections(device)
        tr.loader = _TimedLoader(tr.loader, sections)
        tr.objective = sections.wrap("forward", tr.objective)
        tr.engine.backward = sections.wrap("backward", tr.engine.backward)
        tr.engine.step = sections.wrap("optimizer", tr.engine.step)
        tr.ema.update = sections.wrap("ema", tr.ema.update)
        tr._point = sections.wrap("logging", tr._point)
        tr._log = sections.wrap("logging", tr._log)
        draw = train_mod.draw_step
        train_mod.draw_step = sections.wrap("randomness", draw)
        try:
            t.steps = warmup
            tr._loop()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()  # 1. end to end, nothing added
            t.steps = warmup + steps
            tr._loop()
            sync(device)
            loop_s = time.perf_counter() - t0
            sections.enabled = True  # 2. the breakdown
            t0 = time.perf_counter()
            t.steps = warmup + 2 * steps
            tr._loop()
            sync(device)
            parts_total = time.perf_counter() - t0
            sections.enabled = False
            bare_s = _bare(tr, draw, steps, warmup)  # 3. the bare step
            dist.barrier()
            t0 = time.perf_counter()  # 4. one checkpoint
            save()
            ckpt_s = time.perf_counter() - t0
        finally:
            train_mod.draw_step = draw
            tr.tracker.finish()
            tr.loader.close()
        flops = tr.flops_per_step
        per_step = {k: v / steps for k, v in sections.seconds.items()}
        per_step["checkpoint"] = ckpt_s / ckpt_every
        per_step["other"] = parts_total / steps - sum(v for k, v in per_step.items()
                                                      if k != "checkpoint")
        e2e_step = loop_s / steps + ckpt_s / ckpt_every
        row = {
            "config": " ".join(config), "sets": sets, "device": _device_name(device),
            "world_size": tr.world, "preset": tr.mcfg.preset, "mask": str(cfg.mask),
            "batch": batch, "backend": cfg.data.backend, "encoding": tr.reader.manifest.encoding,
            "zero_stage": tr.ds_config["zero_optimization"]["stage"],
            "precision": tr.precision, "compile": t.compile, "steps": steps, "warmup": warmup,
            "attention": getattr(tr.engine.module, "attention_backend", None),
            "attention_why": getattr(tr.engine.module, "attention_reason", None),
            "e2e_img_s": batch / e2e_step, "bare_img_s": batch / (bare_s / steps),
            "e2e_step_s": e2e_step, "bare_step_s": bare_s / steps,
            "breakdown_step_s": sum(per_step.values()), "parts_s": per_step,
            "ckpt_s": ckpt_s, "ckpt_every": ckpt_every, "flops_per_step": flops,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "gpu_peak_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                             if device.type == "cuda" else None),
        }
        row["ratio"] = row["e2e_img_s"] / row["bare_img_s"]
        if device.type == "cuda":
            row["mfu"] = flops / tr.world / e2e_step / matmul_peak(device)
        return row


def _bare(tr, draw, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` engine steps on one fixed batch on the device (same masks)."""
    import torch
    t, device = tr.t, tr.device
    batch = next(tr.loader)
    r = draw(t.seed, 0, tr.micro_global, tr.rank * tr.local, (tr.rank + 1) * tr.local,
             tr.loader.sample_shape, tr.diffusion.num_timesteps, tr.cfg.mask, tr.mcfg.grid,
             device, groups=tr.mcfg.token_groups)

    def step():
        for _ in range(t.grad_accum):
            with torch.autocast(**tr.amp):
                loss = tr.objective(tr.engine, batch, r.keep_idx, r.t, r.noise)
            tr.engine.backward(loss)
            tr.engine.step()
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def _device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} threads)"


def format_row(r: dict) -> str:
    ms = 1e3
    head = (f"{r['config']} {' '.join('--set ' + s for s in r['sets'])}".strip() +
            f"\n{r['device']}, {r['world_size']} rank(s); {r['preset']}, mask {r['mask']}, "
            f"batch {r['batch']}; {r['backend']} loader on {r['encoding']} shards; ZeRO "
            f"{r['zero_stage']}, {r['precision']}, compile {'on' if r['compile'] else 'off'}; "
            f"{r['steps']} steps per pass after {r['warmup']} warm-up")
    lines = [head, "",
             f"{'':44}{'img/s':>10}{'ms/step':>10}",
             f"{'end to end (the real loop + checkpoints)':44}{r['e2e_img_s']:>10.1f}"
             f"{r['e2e_step_s'] * ms:>10.1f}",
             f"{'bare step (engine only, one batch on device)':44}{r['bare_img_s']:>10.1f}"
             f"{r['bare_step_s'] * ms:>10.1f}",
             f"{'end to end / bare':44}{r['ratio']:>10.1%}", "",
             f"{'breakdown (the timed pass)':44}{'ms/step':>10}{'share':>8}"]
    total = r["breakdown_step_s"]
    for key, label in PARTS:
        v = r["parts_s"].get(key, 0.0)
        lines.append(f"  {label:42}{v * ms:>10.2f}{v / total:>8.1%}")
    lines.append(f"  {'total':42}{total * ms:>10.2f}{1:>8.0%}")
    extra = [f"checkpoint {r['ckpt_s']:.2f} s every {r['ckpt_every']} steps",
             f"peak RSS {r['peak_rss_gib']:.2f} GiB"]
    if r.get("gpu_peak_gib") is not None:
        extra.append(f"GPU peak {r['gpu_peak_gib']:.2f} GiB")
    if r.get("mfu") is not None:
        extra.append(f"MFU {r['mfu']:.1%} (analytic FLOPs / measured bf16 matmul peak)")
    lines.append("; ".join(extra))
    return "\n".join(lines)


GRID = {"data.backend": ("torch", "dali"), "train.zero_stage": ("0", "2"),
        "train.compile": ("false", "true")}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", action="append", required=True, metavar="YAML",
                    help="training config(s), as for maskdm train")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="config overrides, as for maskdm train")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per pass (default 30)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps first (compilation, allocator, loader start; default 5)")
    ap.add_argument("--grid", action="store_true",
                    help="one row per data.backend {torch, dali} x train.zero_stage {0, 2} x "
                    "train.compile {off, on} (each a fresh process), for each --shards folder")
    ap.add_argument("--shards", nargs="+", default=None, metavar="DIR",
                    help="with --grid: shard folders to run on (e.g. one dwt16 and one jpeg "
                    "folder of the same images); default: the config's data.shards")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write the row(s) as JSON")


def run(args) -> int:
    from .config import ConfigError
    if args.steps < 1 or args.warmup < 1:
        print("error: --steps and --warmup must be >= 1", file=sys.stderr)
        return 2
    if args.grid:
        return _grid(args)
    try:
        row = measure(args.config, args.sets, args.steps, args.warmup)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import dist
    if dist.is_main():
        print(format_row(row))
        if args.json:
            args.json.write_text(json.dumps(row, indent=2))
    return 0


def _grid(args) -> int:
    import itertools
    rows, failed = [], []
    shard_sets = args.shards or [None]
    combos = list(itertools.product(*GRID.values()))
    with tempfile.TemporaryDirectory(prefix="maskdm-grid-") as tmp:
        for shards, combo in itertools.product(shard_sets, combos):
            sets = [*args.sets, *(f"{k}={v}" for k, v in zip(GRID, combo))]
            if shards:
                sets.append(f"data.shards={shards}")
            out = Path(tmp) / f"row{len(rows) + len(failed)}.json"
            cmd = [sys.executable, "-m", "maskdm", "bench", "train", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--json", str(out),
                   *[a for c in args.config for a in ("--config", c)],
                   *[a for s in sets for a in ("--set", s)]]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                why = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                failed.append((sets, why))
                print(f"failed: {' '.join(sets)}: {why}", flush=True)
                continue
            row = json.loads(out.read_text())
            rows.append(row)
            print(_grid_line(row), flush=True)
    print("\n" + _grid_table(rows))
    for sets, why in failed:
        print(f"not measured: {' '.join(sets)}: {why}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed and not rows else 0


def _grid_line(r: dict) -> str:
    return (f"{r['backend']:>6} {r['encoding']:>6} ZeRO {r['zero_stage']} "
            f"compile {'on ' if r['compile'] else 'off'} {r['e2e_img_s']:>9.1f} "
            f"{r['bare_img_s']:>9.1f} {r['ratio']:>7.1%} "
            f"{r['parts_s'].get('data', 0) / r['breakdown_step_s']:>7.1%}")


def _grid_table(rows: list[dict]) -> str:
    head = (f"{'loader':>6} {'shards':>6} {'':6} {'':11} {'e2e img/s':>9} {'bare':>9} "
            f"{'e2e/bare':>7} {'data':>7}")
    return "\n".join([head] + [_grid_line(r) for r in rows])

