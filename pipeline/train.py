"""``maskdm train``: the training loop (pre-training with MSM, fine-tuning with DSM).

Everything that can be checked is checked before the engine starts (config, shards, shapes,
labels, batch divisibility, the init checkpoint). The loop trains through the DeepSpeed engine,
draws each global batch's randomness from (seed, step), updates the EMA after every optimizer
step, syncs with the host only at log/checkpoint steps, checkpoints every ``ckpt_every`` steps
and on SIGTERM/SIGINT, and reports to MLflow from rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from model.diffusion import GaussianDiffusion
from model.objective import DiffusionObjective
from model.rng import draw_step
from preprocessing.manifest import DatasetError

from . import checkpoint as ckpt
from . import dist
from .config import Config, ConfigError, check_shapes, deepspeed_config, precision_of, to_yaml
from .ema import EMA

EXIT_NONFINITE = 3
FIXED_ON_RESUME = ("model.", "diffusion.", "mask.", "data.space", "train.stage", "train.seed",
                   "train.global_batch", "train.grad_accum")


class TrainingStopped(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "mlflow", "webdataset", "pywt", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is simply not reported
            pass
    try:
        import nvidia.dali
        out["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return out


def prepare(cfg: Config):
    """Checks that need the data: -> (reader, model config). Raises ConfigError."""
    from pipeline.data.shards import ShardReader
    if not cfg.data.shards:
        raise ConfigError("data.shards is not set: point it at a folder made by `maskdm shard`")
    try:
        reader = ShardReader(cfg.data.shards)
    except DatasetError as e:
        raise ConfigError(f"data.shards: {e}") from None
    m = reader.manifest
    if cfg.data.image_size is not None and cfg.data.image_size != m.image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but {cfg.data.shards} holds "
                          f"{m.image_size}px images")
    mcfg = check_shapes(cfg, m.image_size)
    from .eval import periodic
    periodic.check(cfg)
    if mcfg.num_classes:
        if not m.labels:
            raise ConfigError(f"model.num_classes={mcfg.num_classes} needs labelled shards "
                              f"(e.g. --source vggface2); {cfg.data.shards} has none")
        if mcfg.num_classes != m.num_classes:
            raise ConfigError(f"model.num_classes={mcfg.num_classes} but the shards have "
                              f"{m.num_classes} identities")
    return reader, mcfg


def _check_resume_config(saved: dict, cfg: Config) -> list[str]:
    now = cfg.flat()
    old = {f"{s}.{k}": v for s, sec in saved.items() for k, v in sec.items()}
    fixed, changed = [], []
    for key in sorted(set(now) | set(old)):
        if now.get(key) != old.get(key):
            (fixed if key.startswith(FIXED_ON_RESUME) else changed).append(
                f"{key}: {old.get(key)!r} -> {now.get(key)!r}")
    if fixed:
        raise ConfigError("cannot resume with a different " + "; ".join(fixed) +
                          " (start a new train.run_dir instead)")
    return changed


def run_training(cfg: Config, *, resume: str | None = None) -> dict:
    t, o = cfg.train, cfg.optim
    device = dist.setup_env(t.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    reader, mcfg = prepare(cfg)
    ds_config = deepspeed_config(cfg, world)
    precision = precision_of(ds_config)
    run_dir = Path(t.run_dir)
    ckpt_root = run_dir / "checkpoints"

    init_weights, parent = None, None
    if t.stage == "finetune":
        try:
            src = ckpt.resolve(t.init_from)
            init_weights, parent = ckpt.load_ema_weights(src)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"train.init_from: {e}") from None
    resume_from = None
    if resume == "auto":
        found = ckpt.complete_checkpoints(ckpt_root)
        resume_from = found[-1] if found else None
    elif resume:
        try:
            resume_from = ckpt.resolve(resume)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"--resume: {e}") from None
    changed = []
    if resume_from is not None:
        changed = _check_resume_config(ckpt.read_meta(resume_from)["config"], cfg)

    dist.init(device)
    log = dist.print0
    from pipeline.data.loader import Loader
    from .engine import build_engine
    from .tracking import Tracker, ui_command

    engine, _ = build_engine(cfg, mcfg, device, ds_config, init_weights)
    diffusion = GaussianDiffusion(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    fid_eval = None
    if cfg.eval.fid_every:
        from .eval.periodic import TrainingFID, check
        fid_eval = TrainingFID(cfg, mcfg, diffusion, device, check(cfg), log=dist.print0)
    torch.manual_seed(t.seed * world + rank)  # anything rank-local from here on
    ema = EMA(engine.module, o.ema_decay)
    objective = DiffusionObjective(diffusion, mcfg.patch_size)
    spec = cfg.mask.spec()
    micro_global = t.global_batch // t.grad_accum
    local = micro_global // world
    loader = Loader(reader, global_batch=micro_global, rank=rank, world_size=world, seed=t.seed,
                    device=device, backend=cfg.data.backend, workers=cfg.data.workers,
                    space=cfg.data.space, hflip=cfg.data.hflip, strict=cfg.data.strict,
                    dali_threads=max(cfg.data.workers, 1))
    step, run_id = 0, None
    if resume_from is not None:
        meta = ckpt.load(engine, ema, resume_from)
        step, run_id = meta["step"], meta.get("mlflow_run_id")
        loader.load_state_dict(meta["loader"])
        log(f"resumed from {resume_from} at step {step} ({meta['loader']['samples_seen']} samples)")
        for c in changed:
            log(f"note: config changed since the checkpoint: {c}")
    elif resume == "auto":
        log(f"no checkpoint in {ckpt_root}: starting from scratch")

    is_main = dist.is_main()
    tags = {"maskdm.stage": t.stage, "maskdm.run_dir": str(run_dir.resolve())}
    if parent and parent.get("mlflow_run_id"):
        tags["maskdm.parent_run_id"] = parent["mlflow_run_id"]
        tags["mlflow.parentRunId"] = parent["mlflow_run_id"]
    tracker = Tracker(enabled=cfg.tracking.enabled and is_main, run_dir=run_dir,
                      experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                      uri=cfg.tracking.uri, run_id=run_id, tags=tags, log=log)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        if run_id is None:
            params = {**cfg.flat(), "world_size": world, "precision": precision,
                      "attention": engine.module.attention_backend,
                      "model.parameters": sum(p.numel() for p in engine.module.parameters()) if
                      not ema.zero3 else sum(m["numel"] for m in ema.meta.values()),
                      **{f"ds.{k}": json.dumps(v) for k, v in ds_config.items()},
                      **{f"version.{k}": v for k, v in _versions().items()}}
            if parent:
                params["init_from.step"] = parent.get("step")
            tracker.log_params(params)
            tracker.log_text(to_yaml(cfg), "config.yaml")
            tracker.log_text(json.dumps(ds_config, indent=2), "deepspeed_config.json")
    run_id = tracker.wait_started() if is_main else None

    log(f"{t.stage}: {mcfg.preset} ({mcfg.depth}+1 blocks, dim {mcfg.dim}), "
        f"{sum(m['numel'] for m in ema.meta.values()) / 1e6:.1f}M parameters, attention "
        f"{engine.module.attention_backend} ({engine.module.attention_reason}); mask {spec} -> "
        f"{spec.num_visible(mcfg.grid)}/{mcfg.num_tokens} visible tokens; {world} rank(s) x "
        f"{local} x {t.grad_accum} accumulation = {t.global_batch} per step; ZeRO "
        f"{ds_config['zero_optimization']['stage']}, {precision}; {reader.num_samples} samples "
        f"in {cfg.data.shards}")

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    amp = dict(device_type=device.type, enabled=precision != "fp32",
               dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    # sampling (grids, FID) autocasts like training on GPUs and runs in fp32 on the CPU
    sample_autocast = amp["dtype"] if amp["enabled"] and device.type == "cuda" else None
    sample_shape = loader.sample_shape
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    n_logged, data_wait = 0, 0.0
    t_log = time.perf_counter()
    last_ckpt = ckpt.tag(step) if resume_from is not None else None
    sampler_net = None
    status, code, message = "FINISHED", 0, ""

    def save(step_now: int) -> None:
        nonlocal last_ckpt
        bad = dist.any_rank(bool(nonfinite.item()))
        if bad:
            raise TrainingStopped(_nonfinite_message(step_now, last_ckpt, ckpt_root), EXIT_NONFINITE)
        meta = {"step": step_now, "loader": loader.state_dict(), "world_size": world,
                "zero_stage": ds_config["zero_optimization"]["stage"], "precision": precision,
                "mlflow_run_id": run_id, "stage": t.stage, "time": time.time(),
                "config": cfg.to_dict(), "model": dataclasses.asdict(mcfg),
                "image_size": reader.image_size, "space": cfg.data.space}
        path = ckpt.save(engine, ema, ckpt_root, step_now, meta, t.keep_last)
        last_ckpt = path.name
        log(f"checkpoint {path}")

    def samples(step_now: int) -> None:
        nonlocal sampler_net
        weights = ema.full_state_dict()  # collective under ZeRO-3
        if not is_main:
            return
        from .sampling import grid, model_from_weights, sample_images
        if sampler_net is None:
            sampler_net = model_from_weights(mcfg, weights, device)
        else:
            sampler_net.load_state_dict(weights)
        labels = None
        if mcfg.num_classes:
            labels = torch.arange(t.sample_n) % mcfg.num_classes
        e = cfg.eval
        imgs = sample_images(sampler_net, diffusion, mcfg, list(range(t.sample_n)),
                             space=cfg.data.space, device=device, sampler=e.sampler,
                             steps=e.steps, eta=e.eta, labels=labels, batch=max(t.sample_n, 1),
                             autocast_dtype=sample_autocast)
        from PIL import Image
        out = run_dir / "samples" / f"step_{step_now:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        g = grid(imgs)
        Image.fromarray(g).save(out)
        tracker.log_image(g, f"samples/step_{step_now:08d}.png")

    last_fid = {"step": None, "value": None}

    def fid(step_now: int) -> None:
        weights = ema.full_state_dict()
        t0 = time.perf_counter()
        value = fid_eval(weights, step_now, autocast_dtype=sample_autocast)
        last_fid.update(step=step_now, value=value)
        if is_main:
            tracker.log_metrics({"fid": value}, step_now)
            log(f"step {step_now}: FID-{cfg.eval.fid_samples} {value:.3f} "
                f"({cfg.eval.sampler} {cfg.eval.steps} steps, {time.perf_counter() - t0:.0f} s)")

    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=step, unit="step", desc=t.stage, dynamic_ncols=True,
               disable=not (is_main and sys.stderr.isatty()), file=sys.stderr)
    try:
        engine.train()
        while step < t.steps:
            for a in range(t.grad_accum):
                w0 = time.perf_counter()
                batch = next(loader)
                data_wait += time.perf_counter() - w0
                micro_index = step * t.grad_accum + a
                r = draw_step(t.seed, micro_index, micro_global, rank * local, (rank + 1) * local,
                              sample_shape, diffusion.num_timesteps, spec, mcfg.grid, device)
                with torch.autocast(**amp):
                    loss = objective(engine, batch, r.keep_idx, r.t, r.noise)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
                nonfinite += (~torch.isfinite(loss.detach())).long()
            step += 1
            n_logged += 1
            ema.update(engine.module, step)
            bar.update(1)

            if step % t.log_every == 0 or step == t.steps:
                loss_avg = dist.all_sum(loss_sum.item()) / (n_logged * t.grad_accum * world)
                if dist.any_rank(bool(nonfinite.item())) and precision != "fp16":
                    raise TrainingStopped(_nonfinite_message(step, last_ckpt, ckpt_root),
                                          EXIT_NONFINITE)
                dt = time.perf_counter() - t_log
                gnorm = engine.get_global_grad_norm()
                metrics = {
                    "loss": loss_avg,
                    "lr": engine.get_lr()[0],
                    "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                    "img_per_s": n_logged * t.global_batch / dt,
                    "data_wait_frac": data_wait / dt,
                    "skipped_samples": dist.all_sum(loader.skipped_samples),
                    "epoch": loader.epoch,
                }
                if precision == "fp16":
                    metrics["skipped_steps"] = float(engine.skipped_steps)
                if device.type == "cuda":
                    metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                tracker.log_metrics(metrics, step)
                line = (f"step {step}/{t.steps}  loss {loss_avg:.4f}  lr {metrics['lr']:.2e}  "
                        f"grad {metrics['grad_norm']:.3f}  {metrics['img_per_s']:.1f} img/s  "
                        f"data-wait {metrics['data_wait_frac']:.0%}  epoch {loader.epoch:.2f}")
                bar.write(line) if not bar.disable else log(line)
                loss_sum.zero_()
                n_logged, data_wait, t_log = 0, 0.0, time.perf_counter()

            if t.sample_every and step % t.sample_every == 0 and step < t.steps:
                samples(step)
            if fid_eval is not None and step % cfg.eval.fid_every == 0 and step < t.steps:
                fid(step)
            if step % t.ckpt_every == 0 or step == t.steps:
                save(step)
            if dist.any_rank(stop["signal"] is not None):
                if ckpt.tag(step) != last_ckpt:
                    save(step)
                name = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal"
                raise TrainingStopped(f"stopped by {name} at step {step}; resume with "
                                      f"`--resume auto`", 128 + (stop["signal"] or 15))
        samples(step)
        if fid_eval is not None and last_fid["step"] != step:
            fid(step)
        export_dir = None
        if is_main:
            from .export import export_weights
            export_dir = export_weights(run_dir / "checkpoints" / last_ckpt, run_dir / "export")
            tracker.log_artifact(export_dir, "model")
    except TrainingStopped as e:
        status = "KILLED" if e.code != EXIT_NONFINITE else "FAILED"
        code, message = e.code, str(e)
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        loader.close()
    delivered = tracker.finish(status)
    if code:
        log(message, file=sys.stderr)
        return {"exit_code": code, "step": step, "run_id": run_id}
    summary = {"exit_code": 0, "step": step, "run_id": run_id, "run_dir": str(run_dir),
               "checkpoint": str(ckpt_root / last_ckpt),
               "samples": str(run_dir / "samples" / f"step_{step:08d}.png"),
               "tracking_uri": tracker.uri, "tracking_ok": delivered,
               "fid": last_fid["value"]}
    log(f"done: {t.steps} steps; checkpoint {summary['checkpoint']}; samples {summary['samples']}"
        + (f"; MLflow run {run_id}: {ui_command(tracker.uri)}" if tracker.enabled else ""))
    return summary


def _nonfinite_message(step: int, last_ckpt: str | None, root: Path) -> str:
    where = f"{root / last_ckpt}" if last_ckpt else "none was written yet"
    return (f"non-finite loss (NaN/Inf) detected by step {step}; stopped without saving. The "
            f"last good checkpoint: {where}. Lower optim.lr, raise optim.warmup_steps or use "
            f"train.precision=fp16 (which skips overflowing steps), then `--resume auto`.")
