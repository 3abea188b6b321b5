"""``maskdm train``: the training run (pre-training with MSM, fine-tuning with DSM), as phases.

``Trainer(cfg, resume).run()`` goes through:

1. ``__init__`` (no process group yet): everything that can be checked before the engine starts
   (config against the shards, shapes, labels, batch divisibility, the init checkpoint, the
   checkpoint to resume and whether its config allows it).
2. ``_build``: process group, DeepSpeed engine, EMA, objective, loader (and training-time FID).
3. ``_restore``: engine, EMA, RNG and loader state of the checkpoint to resume, if any.
4. ``_start_tracking``: the MLflow run (rank 0), the resolved config in the run folder.
5. ``_loop``: ``_step`` (one optimizer step through the engine, randomness drawn from
   (seed, step)), then what is due at that step: ``_log`` (the only host syncs), ``_sample_grid``,
   ``_fid``, ``_save``; SIGTERM/SIGINT stop it after a checkpoint.
6. ``_finish``: final samples, FID and export, the MLflow status, the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from maskdm.model.diffusion import GaussianDiffusion
from maskdm.model.flops import step_flops
from maskdm.model.objective import DiffusionObjective
from maskdm.shardformat.fsutil import redact_url
from maskdm.shardformat.manifest import DatasetError
from maskdm.shardformat.reader import SampleError
from maskdm.shardformat.lease import LeaseLost
from maskdm.shardformat.remote import CacheFull, RemoteError, RemoteUnreachable

from . import checkpoint as ckpt
from . import dist
from .config import Config, ConfigError, check_shapes, deepspeed_config, precision_of, to_yaml
from .data.order import OrderError
from .ema import EMA
from .randomness import draw_step, rank_seed

EXIT_NONFINITE = 3
EXIT_DATA = 4  # damaged data (data.strict), a store or bucket unreachable past the patience
EXIT_DISK_FULL = 5  # a checkpoint did not fit on its disk; the previous one is intact
EXIT_REQUEUE = 75  # SIGTERM / SIGUSR1 (pre-emption): checkpointed (and uploaded); re-queue me
REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FIXED_ON_RESUME = ("model.", "diffusion.", "mask.", "data.space", "train.stage", "train.seed",
                   "train.global_batch", "train.grad_accum", "train.mae_weight")


class TrainingStopped(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_training(cfg: Config, *, resume: str | None = None) -> dict:
    """Train as configured; ``resume`` is None, ``"auto"`` or a checkpoint/run path."""
    return Trainer(cfg, resume).run()


def prepare(cfg: Config):
    """Checks that need the data: -> (reader, model config). Raises ConfigError."""
    from maskdm.shardformat.reader import ShardReader
    if not cfg.data.shards:
        raise ConfigError("data.shards is not set: point it at a folder made by `maskdm shard`")
    from maskdm.shardformat.remote import CacheOptions
    d = cfg.data
    try:
        reader = ShardReader(d.shards, cache=CacheOptions(d.cache_dir, d.cache_limit_gb,
                                                          d.remote_patience_s, d.remote_timeout_s))
    except DatasetError as e:
        raise ConfigError(f"data.shards: {e}") from None
    m = reader.manifest
    if cfg.data.image_size is not None and cfg.data.image_size != m.image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but {cfg.data.shards} holds "
                          f"{m.image_size}px images")
    mcfg = check_shapes(cfg, m.image_size)
    from .eval import training_fid, training_score
    training_fid.check(cfg)
    training_score.check(cfg)
    if mcfg.num_classes:
        if not m.labels:
            raise ConfigError(f"model.num_classes={mcfg.num_classes} needs labelled shards "
                              f"(e.g. --source vggface2); {cfg.data.shards} has none")
        if mcfg.num_classes != m.num_classes:
            raise ConfigError(f"model.num_classes={mcfg.num_classes} but the shards have "
                              f"{m.num_classes} identities")
    return reader, mcfg


def _check_resume_config(saved: dict, cfg: Config) -> list[str]:
    """Keys of the checkpoint's config that differ now: a fixed one refuses, the others are
    listed. A key the checkpoint lacks (written by an older maskdm) counts as its default, the
    value that older version behaved as."""
    now, defaults = cfg.flat(), Config().flat()
    old = {f"{s}.{k}": v for s, sec in saved.items() for k, v in sec.items()}
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    fixed, changed = [], []
    for key in sorted(set(now) | set(old)):
        if now.get(key) != old.get(key):
            (fixed if key.startswith(FIXED_ON_RESUME) else changed).append(
                f"{key}: {old.get(key)!r} -> {now.get(key)!r}")
    if fixed:
        raise ConfigError("cannot resume with a different " + "; ".join(fixed) +
                          " (start a new train.run_dir instead)")
    return changed


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.device = dist.setup_env(self.t.device)
        self.world, self.rank = dist.launch_world_size(), dist.launch_rank()
        self.reader, self.mcfg = prepare(cfg)
        self._scratch: Path | None = None  # made (private) when first needed: see .scratch
        from maskdm.shardformat.patience import StoreOptions
        from maskdm.shardformat.remote import is_remote

        from .runstore import RunStore
        try:  # a local (shared) run folder, or one in a bucket with a local copy per node
            self.store = RunStore(self.t.run_dir,
                                  self.scratch if is_remote(self.t.run_dir) else None,
                                  StoreOptions(cfg.data.remote_patience_s,
                                               cfg.data.remote_timeout_s),
                                  rank=self.rank, local_rank=dist.launch_local_rank(),
                                  world=self.world)
        except ValueError as e:
            raise ConfigError(f"train.run_dir: {e}") from None
        self.run_dir = self.store.local
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log = self._print
        self.bar = None
        self._lock = self._lock_run_folder() if self.rank == 0 else None
        if self.rank == 0 and self.store.remote:  # one writer per run folder in a bucket
            from maskdm.shardformat.lease import LeaseHeld
            try:
                self.store.hold("maskdm train", self.t.lease_s, self.log)
            except LeaseHeld as e:
                raise ConfigError(str(e)) from None
        try:
            self._prepare(cfg, resume)
        except BaseException:
            self.store.release()
            raise

    def _prepare(self, cfg: Config, resume: str | None) -> None:
        self.resume_mode = resume
        self.resume_from = self._resume_source(resume)
        self.resume_meta = ckpt.read_meta(self.resume_from) if self.resume_from else None
        try:
            self.ds_config = deepspeed_config(cfg, self.world)
        except ConfigError as e:
            m = self.resume_meta
            if m is None or m.world_size == self.world:
                raise
            raise ConfigError(f"cannot resume {self.resume_from} (written by {m.world_size} "
                              f"ranks) on {self.world} ranks: {e}; choose a number of ranks that "
                              f"divides it") from None
        if self.resume_meta is not None and ckpt.needs_universal(self.resume_meta, self.world):
            # ZeRO partitions of another world size: loaded through DeepSpeed's universal format
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.precision = precision_of(self.ds_config)
        self.micro_global = self.t.global_batch // self.t.grad_accum
        self.local = self.micro_global // self.world
        self.init_fresh: set[str] = set()
        self.init_weights, self.parent = self._init_source()
        # Cumulative training FLOPs (logged as train_flops): the init_from chain's, then this run's
        self.flops_per_step = step_flops(self.mcfg, cfg.mask, self.t.global_batch)
        self.flops_base = ckpt.cumulative_flops(self.parent) if self.parent is not None else 0.0
        self.changed = []
        if self.resume_from is not None:
            self.changed = _check_resume_config(ckpt.read_meta(self.resume_from).config, cfg)
        self.finished = self._already_finished()
        self.step, self.run_id, self.last_ckpt = 0, None, None
        self.world_change = None  # (old, new, step) when resumed on another number of ranks
        self.stop_signal = None
        self.last_fid = {"step": None, "value": None}
        self.last_score = None
        self.sampler_net = None

    # ------------------------------------------------------------------ phase 1: sources
    def _init_source(self):
        """Fine-tuning: the pre-trained EMA weights and that checkpoint's meta."""
        if self.t.stage != "finetune":
            return None, None
        try:
            weights, meta = ckpt.load_ema_weights(ckpt.resolve(self.t.init_from))
        except ckpt.CheckpointError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        from maskdm.model import ModelConfig

        from .weights import transfer_weights
        try:  # another image size (positional embedding interpolated) or a dropped decoder
            weights, notes, self.init_fresh = transfer_weights(
                weights, ModelConfig(**meta.model), self.mcfg,
                f"train.init_from={self.t.init_from}")
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        for note in notes:
            self.log(note)
        self.log(f"fine-tuning from the EMA weights of {self.t.init_from} (step {meta.step} of "
                 f"its {meta.stage} run)")
        return weights, meta

    def _already_finished(self) -> bool:
        """Resuming a run that already reached train.steps and exported its weights: nothing to
        do (no engine, no MLflow call, no new logged model)."""
        m = self.resume_meta
        if m is None or m.step < self.t.steps:
            return False
        try:
            done = json.loads((self.run_dir / "export" / "config.json").read_text())
        except (OSError, ValueError):
            if not self.store.remote:
                return False
            done = self.store.bucket.read_json("export", "config.json") or {}
        return done.get("step") == m.step

    @property
    def scratch(self) -> Path:
        """This node's private working folder for the run (made on first use)."""
        if self._scratch is None:
            self._scratch = private_scratch(self.t.scratch_dir, self.t.run_dir)
        return self._scratch

    def _lock_run_folder(self):
        """One job per run folder: rank 0 holds an exclusive lock on ``RUN_DIR/.maskdm.lock`` (of
        the node's copy for a bucket) for as long as it runs; a second job is refused, naming
        the holder. (A lock on a network filesystem holds only where it supports ``flock``.)"""
        import fcntl
        import socket
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / ".maskdm.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.store.where} is in use by another `maskdm train` "
                              f"({holder}): wait for it to finish, or choose another "
                              f"train.run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        return f

    def _refuse_used_folder(self, newest: str | None) -> None:
        """A run without --resume into a folder that holds another run's checkpoints would mix
        the two (pruning by step number deletes one run's checkpoints for the other's)."""
        if newest is not None:
            raise ConfigError(f"{self.store.where} already holds a run (newest checkpoint "
                              f"{newest}): `--resume auto` continues it; for a new run choose "
                              f"another train.run_dir, or delete {self.store.where}/checkpoints "
                              f"to start this one over")

    def _resume_source(self, resume: str | None) -> Path | None:
        if resume is None:
            try:
                newest = self.store.newest() if self.store.remote else next(
                    (p.name for p in reversed(ckpt.complete_checkpoints(self.ckpt_root))), None)
            except RemoteError as e:
                raise ConfigError(f"train.run_dir: {e}") from None
            self._refuse_used_folder(newest)
        if self.store.remote:
            if resume not in (None, "auto"):
                raise ConfigError(f"--resume {resume}: a run folder in a bucket resumes from its "
                                  f"newest committed checkpoint: use --resume auto")
            if resume is None:
                return None
            try:
                name = self.store.newest()
                if name is None:
                    return None
                if self.rank == 0:
                    self.store.fetch_run_files()
                done = self.store.bucket.read_json("export", "config.json") or {}
                if int(name[5:]) >= self.t.steps and done.get("step") == int(name[5:]):
                    # finished and exported: its meta is all `_already_finished` needs
                    return self.store.fetch_checkpoint(name, world=self.world,
                                                       only=("meta.json",))
                return self.store.fetch_checkpoint(name, world=self.world)
            except RemoteError as e:
                raise ConfigError(f"--resume auto: {e}") from None
        if resume == "auto":
            found = ckpt.complete_checkpoints(self.ckpt_root)
            return found[-1] if found else None
        if not resume:
            return None
        try:
            return ckpt.resolve(resume)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"--resume: {e}") from None

    # ------------------------------------------------------------------ phase 2: build
    def _build(self) -> None:
        from maskdm.pipeline.data.loader import Loader

        from .engine import build_engine
        cfg, t, mcfg = self.cfg, self.t, self.mcfg
        dist.init(self.device)
        self.engine, _ = build_engine(cfg, mcfg, self.device, self.ds_config, self.init_weights,
                                      self.init_fresh)
        self.diffusion = GaussianDiffusion(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        self.fid_eval = None
        if cfg.eval.fid_every:
            from .eval.training_fid import TrainingFID, check
            self.fid_eval = TrainingFID(cfg, mcfg, self.diffusion, self.device, check(cfg),
                                        log=dist.print0)
        self.score_eval = None
        if cfg.eval.score_every:
            from .eval.training_score import TrainingScore
            self.score_eval = TrainingScore(cfg, mcfg, self.diffusion, self.device,
                                            log=dist.print0)
        torch.manual_seed(rank_seed(t.seed, self.world, self.rank))  # anything rank-local
        o = cfg.optim
        self.ema = EMA(self.engine.module, o.ema_decay, every=o.ema_every, warmup=o.ema_warmup,
                       power=o.ema_power, start=o.ema_start, optimizer=self.engine.optimizer)
        self.objective = DiffusionObjective.for_model(
            self.diffusion, mcfg, t.mae_weight, cfg.diffusion.loss_weight,
            cfg.diffusion.min_snr_gamma)
        try:
            self.loader = Loader(self.reader, global_batch=self.micro_global, rank=self.rank,
                                 world_size=self.world, seed=t.seed, device=self.device,
                                 backend=cfg.data.backend, workers=cfg.data.workers,
                                 space=cfg.data.space, hflip=cfg.data.hflip,
                                 strict=cfg.data.strict, dali_threads=max(cfg.data.workers, 1),
                                 lookahead=cfg.data.cache_lookahead,
                                 partitions=cfg.data.partitions,
                                 window=cfg.data.shuffle_window)
        except SampleError as e:
            raise ConfigError(f"data.shards: {e}") from None
        except OrderError as e:
            raise ConfigError(str(e)) from None
        amp_on = self.precision != "fp32"
        self.amp = dict(device_type=self.device.type, enabled=amp_on,
                        dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        # sampling (grids, FID) autocasts like training on GPUs and runs in fp32 on the CPU
        self.sample_autocast = self.amp["dtype"] if amp_on and self.device.type == "cuda" else None

    # ------------------------------------------------------------------ phase 3: restore
    def _restore(self) -> None:
        if self.resume_from is None:
            if self.resume_mode == "auto":
                start = "from the pre-trained weights above" if self.t.stage == "finetune" \
                    else "from scratch"
                self.log(f"no checkpoint of this run yet in {self.store.where}: starting at step "
                         f"0 {start}")
            return
        universal, old = None, self.resume_meta
        try:
            if ckpt.needs_universal(old, self.world):
                self.log(f"the world size changed since {self.resume_from.name}: "
                         f"{old.world_size} -> {self.world} ranks; converting its ZeRO-"
                         f"{old.zero_stage} partitions with DeepSpeed's universal checkpoint "
                         f"(in {self.scratch})")
                universal = ckpt.universal_copy(self.resume_from, self.scratch)
            meta = ckpt.load(self.engine, self.ema, self.resume_from, universal)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"--resume: {e}") from None
        self.step, self.run_id = meta.step, meta.mlflow_run_id
        self.last_ckpt = ckpt.tag(self.step)
        try:
            self.loader.load_state_dict(meta.loader)
        except OrderError as e:
            raise ConfigError(f"--resume: {e}") from None
        self.log(f"resumed from {self.resume_from} at step {self.step} ({meta.samples_seen} "
                 f"samples)")
        if meta.world_size != self.world:
            took = ckpt.conversion_seconds(universal, meta_tag := ckpt.tag(meta.step)) \
                if universal is not None else None
            self.world_change = (meta.world_size, self.world, meta.step)
            self.log(f"world size {meta.world_size} -> {self.world}: the data stream continues "
                     f"at sample {meta.samples_seen} (the same global batches), EMA, LR schedule "
                     f"and train_flops carry on" + (f"; conversion of {meta_tag} took "
                                                    f"{took:.0f} s" if took is not None else ""))
        for c in self.changed:
            self.log(f"note: config changed since the checkpoint: {c}")

    # ------------------------------------------------------------------ phase 4: tracking
    def _start_tracking(self) -> None:
        from .tracking import Tracker, read_record
        cfg, t = self.cfg, self.t
        is_main = dist.is_main()
        tags = {"maskdm.stage": t.stage, "maskdm.run_dir": self.store.url or
                str(self.run_dir.resolve())}
        if self.parent is not None and self.parent.mlflow_run_id:
            tags["maskdm.parent_run_id"] = self.parent.mlflow_run_id
            tags["mlflow.parentRunId"] = self.parent.mlflow_run_id
        if cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        if self.run_id is None and self.resume_from is not None and is_main:
            # resumed from a checkpoint saved before the MLflow run existed (server down then)
            self.run_id = (read_record(self.run_dir) or {}).get("run_id")
        self.tracker = Tracker(enabled=cfg.tracking.enabled and is_main, run_dir=self.run_dir,
                               experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                               uri=cfg.tracking.uri, run_id=self.run_id, tags=tags, log=self.log,
                               record=is_main)
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config,
                                                                           indent=2))
            if self.run_id is None:
                self.tracker.log_params(self._run_params())
                self.tracker.log_text(to_yaml(cfg), "config.yaml")
                self.tracker.log_text(json.dumps(self.ds_config, indent=2),
                                      "deepspeed_config.json")
        self.run_id = self.tracker.wait_started() if is_main else None
        if is_main:  # tags (params cannot change when a resumed run has another world size)
            tags = {"maskdm.world_size": str(self.world)}
            if self.world_change is not None:
                old, new, at = self.world_change
                tags[f"maskdm.world_size_change.step_{at}"] = f"{old} -> {new}"
            self.tracker.set_tags(tags)
        if cfg.tracking.system_metrics_every > 0:
            self.tracker.start_system_metrics(cfg.tracking.system_metrics_every)
        self.log(self._banner())

    def _num_parameters(self) -> int:
        return sum(m["numel"] for m in self.ema.meta.values())

    def _run_params(self) -> dict:
        params = {**self.cfg.flat(), "world_size": self.world, "precision": self.precision,
                  "attention": self.engine.module.attention_backend,
                  "model.parameters": self._num_parameters(),
                  **{f"ds.{k}": json.dumps(v) for k, v in self.ds_config.items()},
                  **{f"version.{k}": v for k, v in _versions().items()}}
        params["train.flops_per_step"] = self.flops_per_step
        if self.parent is not None:
            params["init_from.step"] = self.parent.step
            params["init_from.train_flops"] = self.flops_base
        return params

    def _banner(self) -> str:
        t, mcfg, spec = self.t, self.mcfg, self.cfg.mask
        decoder = (f" + decoder {mcfg.decoder_depth} blocks, dim {mcfg.decoder_dim}"
                   if mcfg.decoder_depth else "")
        extras = "".join([f", MAE weight {t.mae_weight}" if t.mae_weight else "",
                          ", flip-conditioned" if mcfg.flip_condition else ""])
        return (f"{t.stage}: {mcfg.preset} ({mcfg.depth}+1 blocks, dim {mcfg.dim}{decoder}), "
                f"{self._num_parameters() / 1e6:.1f}M parameters{extras}, attention "
                f"{self.engine.module.attention_backend} ({self.engine.module.attention_reason}); "
                f"mask {spec} -> {spec.num_visible(mcfg.grid) * mcfg.token_groups}/"
                f"{mcfg.num_tokens} visible tokens; "
                f"{self.world} rank(s) x {self.local} x {t.grad_accum} accumulation = "
                f"{t.global_batch} per step; ZeRO {self.ds_config['zero_optimization']['stage']}, "
                f"{self.precision}; {self.reader.num_samples} samples in {self.cfg.data.shards}")

    # ------------------------------------------------------------------ phase 5: the loop
    def _step(self) -> None:
        """One optimizer step (``grad_accum`` micro-batches); no host sync."""
        t = self.t
        for a in range(t.grad_accum):
            w0 = time.perf_counter()
            try:
                batch = next(self.loader)
            except CacheFull as e:
                raise TrainingStopped(f"{e}. Stopped at step {self.step};"
                                      + self._last_good(), EXIT_DISK_FULL) from None
            except (SampleError, RemoteError) as e:
                where = (f"{self.ckpt_root / self.last_ckpt}" if self.last_ckpt
                         else "none was written yet")
                then = ("; `--resume auto` continues exactly once it answers again"
                        if isinstance(e, RemoteUnreachable) else "")
                raise TrainingStopped(f"data: {e}. Stopped at step {self.step} without saving; "
                                      f"the last good checkpoint: {where}{then}",
                                      EXIT_DATA) from None
            self.data_wait += time.perf_counter() - w0
            if self.trace is not None:
                self.trace.write(json.dumps({"step": self.step + 1, "micro": a,
                                             "keys": list(batch.keys)}) + "\n")
            r = draw_step(t.seed, self.step * t.grad_accum + a, self.micro_global,
                          self.rank * self.local, (self.rank + 1) * self.local,
                          self.loader.sample_shape, self.diffusion.num_timesteps, self.cfg.mask,
                          self.mcfg.grid, self.device, groups=self.mcfg.token_groups)
            with torch.autocast(**self.amp):
                loss = self.objective(self.engine, batch, r.keep_idx, r.t, r.noise)
            self.engine.backward(loss)
            if a == t.grad_accum - 1 and self.own_grad_norm and self._point_due(self.step + 1):
                self.grad_norm = _grad_norm(self.engine.module)  # before step() zeroes them
            self.engine.step()
            self.loss_sum += loss.detach().float()
            self.point_sum += loss.detach().float()
            self.nonfinite += (~torch.isfinite(loss.detach())).long()
        self.step += 1
        self.n_logged += 1
        self.n_point += 1
        self.ema.update(self.engine.module, self.step)

    def _loop(self) -> None:
        t, cfg = self.t, self.cfg
        self.loss_sum = torch.zeros((), device=self.device)
        self.point_sum = torch.zeros((), device=self.device)
        self.n_point, self.points = 0, []
        self.point_every = max(1, t.steps // cfg.tracking.points)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        # ZeRO 0 with an fp32 optimizer: DeepSpeed clips but keeps no norm; we take the global
        # norm of the (already all-reduced) gradients ourselves at the steps that log it
        self.own_grad_norm = self.ds_config["zero_optimization"]["stage"] == 0
        self.grad_norm = torch.full((), float("nan"), device=self.device)
        self.n_logged, self.data_wait, self.t_log = 0, 0.0, time.perf_counter()
        self.t_start = time.time()  # store outages are counted from here (this process's run)
        self.trace = None
        if cfg.data.trace:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.trace = open(self.run_dir / f"data_trace_rank{self.rank:05d}.jsonl", "a",
                              buffering=1)
        self.engine.train()
        while self.step < t.steps:
            self._step()
            self.bar.update(1)
            step = self.step
            if self._point_due(step):
                self._point()
            if step % t.log_every == 0 or step == t.steps:
                self._log()
            if t.sample_every and step % t.sample_every == 0 and step < t.steps:
                self._sample_grid()
            if self.fid_eval is not None and step % cfg.eval.fid_every == 0 and step < t.steps:
                self._fid()
            if self.score_eval is not None and step % cfg.eval.score_every == 0 and \
                    step < t.steps:
                self._score()
            if step % t.ckpt_every == 0 or step == t.steps:
                self._save()
            if dist.any_rank(self.stop_signal is not None):
                if ckpt.tag(step) != self.last_ckpt:
                    self._save()
                requeue = dist.any_rank(self.stop_signal in REQUEUE_SIGNALS)
                self._finish_upload()
                where = f" (uploaded to {self.store.url})" if self.store.remote else ""
                if requeue:
                    raise TrainingStopped(
                        f"stopped by {signal.Signals(self.stop_signal or signal.SIGTERM).name} "
                        f"at step {step} after checkpoint {self.last_ckpt}{where}; exit code "
                        f"{EXIT_REQUEUE}: re-queue the job with `--resume auto`", EXIT_REQUEUE)
                raise TrainingStopped(f"interrupted at step {step} after checkpoint "
                                      f"{self.last_ckpt}{where}; resume with `--resume auto`",
                                      128 + signal.SIGINT)

    def _point_due(self, step: int) -> bool:
        return step % self.point_every == 0 or step == self.t.steps

    def _point(self) -> None:
        """One point of the metric curves, kept on the device until the next console line."""
        gnorm = self.engine.get_global_grad_norm()
        if gnorm is None and self.own_grad_norm:
            gnorm = self.grad_norm
        if isinstance(gnorm, torch.Tensor):
            gnorm = gnorm.detach().float().reshape(())
        self.points.append({
            "step": self.step, "time": time.time(),
            "loss": self.point_sum / (self.n_point * self.t.grad_accum),
            "lr": self.engine.get_lr()[0],
            "grad_norm": gnorm if gnorm is not None else float("nan"),
            "epoch": self.loader.epoch, "train_flops": self.train_flops})
        self.point_sum = torch.zeros((), device=self.device)
        self.n_point = 0

    def _flush_points(self) -> list[dict]:
        """The points gathered since the last console line as metric records (one host sync and
        one all-reduce for all of them)."""
        points, self.points = self.points, []
        if not points:
            return []
        losses = torch.stack([p["loss"] for p in points]).double().cpu()  # the one sync
        losses = dist.all_reduce_cpu(losses) / self.world
        for p, loss in zip(points, losses.tolist()):
            # grad norms on the device are ready by now: reading them waits for nothing
            p.update(loss=loss, grad_norm=float(p["grad_norm"]))
        return points

    def _log(self) -> None:
        """A console line with the average loss and the rates since the last one, plus the metric
        points gathered meanwhile: the loop's only host syncs."""
        t, step, engine = self.t, self.step, self.engine
        loss_avg = dist.all_sum(self.loss_sum.item()) / (self.n_logged * t.grad_accum * self.world)
        if dist.any_rank(bool(self.nonfinite.item())) and self.precision != "fp16":
            raise TrainingStopped(self._nonfinite_message(), EXIT_NONFINITE)
        records = self._flush_points()
        dt = time.perf_counter() - self.t_log
        rates = {
            "img_per_s": self.n_logged * t.global_batch / dt,
            "data_wait_frac": self.data_wait / dt,
            "skipped_samples": dist.all_sum(self.loader.skipped_samples),
        }
        if self.precision == "fp16":
            rates["skipped_steps"] = float(engine.skipped_steps)
        pre = self.loader.prefetcher  # shards from object storage: this rank's cache view
        cache = ""
        if self.store.remote:
            rates["ckpt_upload_s"] = self.store.stats["upload_s"]
            rates["ckpt_upload_mb"] = self.store.stats["upload_bytes"] / 2 ** 20
        if pre is not None:
            rates["shard_downloads"] = float(pre.stats["downloads"])
            rates["download_retries"] = float(pre.remote.stats["retries"])
            down, outages = pre.remote.patience.unreachable_seconds(self.t_start)
            rates["store_unreachable_s"], rates["store_outages"] = down, float(outages)
            if pre.hit_rate is not None:
                rates["shard_cache_hit_rate"] = pre.hit_rate
                cache = f"  cache hits {pre.hit_rate:.0%}"
        if records and records[-1]["step"] == step:
            records[-1].update(rates)
        else:
            records.append({"step": step, "time": time.time(), **rates})
        for r in records:
            r = dict(r)
            at, ts = r.pop("step"), r.pop("time")
            self.tracker.log_metrics(r, at, timestamp=ts)
        gnorm = next((r["grad_norm"] for r in reversed(records) if "grad_norm" in r),
                     float("nan"))
        line = (f"step {step}/{t.steps}  loss {loss_avg:.4f}  lr {engine.get_lr()[0]:.2e}  "
                f"grad {gnorm:.3f}  {rates['img_per_s']:.1f} img/s  "
                f"data-wait {rates['data_wait_frac']:.0%}{cache}  epoch {self.loader.epoch:.2f}")
        self.log(line)
        self.loss_sum.zero_()
        self.n_logged, self.data_wait, self.t_log = 0, 0.0, time.perf_counter()

    @property
    def train_flops(self) -> float:
        return self.flops_base + self.step * self.flops_per_step

    def _save(self) -> None:
        """Collective: a checkpoint of this step (refused if a loss went non-finite)."""
        if dist.any_rank(bool(self.nonfinite.item())):
            raise TrainingStopped(self._nonfinite_message(), EXIT_NONFINITE)
        meta = ckpt.CheckpointMeta(
            step=self.step, loader=self.loader.state_dict(), world_size=self.world,
            zero_stage=self.ds_config["zero_optimization"]["stage"], precision=self.precision,
            stage=self.t.stage, config=self.cfg.to_dict(), model=dataclasses.asdict(self.mcfg),
            image_size=self.reader.image_size, space=self.cfg.data.space,
            mlflow_run_id=self.tracker.run_id or self.run_id, time=time.time(),
            train_flops=self.train_flops)
        try:
            if self.store.remote:  # the previous upload first: its local folder must stay
                self.store.wait(self.log, before=ckpt.tag(self.step))
            path = ckpt.save(self.engine, self.ema, self.ckpt_root, meta, self.t.keep_last,
                             node_local=self.store.remote)
        except LeaseLost as e:
            raise TrainingStopped(str(e), EXIT_DATA) from None
        except RemoteError as e:
            raise TrainingStopped(f"checkpoint upload: {e}. Stopped at step {self.step}; resume "
                                  f"with `--resume auto` once the bucket answers (it continues "
                                  f"from the newest committed checkpoint)", EXIT_DATA) from None
        except (OSError, RuntimeError) as e:
            full = disk_full_message(e, self.ckpt_root, self.step,
                                     getattr(self, "ckpt_bytes", None))
            if full is None:
                raise
            raise TrainingStopped(full + self._last_good(), EXIT_DISK_FULL) from None
        self.last_ckpt = path.name
        self.ckpt_bytes = tree_bytes(path)
        if self.store.remote:
            self.store.upload_checkpoint(path, self.t.keep_last, self.log)
            self.log(f"checkpoint {path} (uploading to {self.store.url}/checkpoints in the "
                     f"background)")
        else:
            self.log(f"checkpoint {path}")
        self._check_space()

    def _sample_grid(self) -> None:
        """A grid of ``train.sample_n`` EMA samples, saved and logged by rank 0."""
        weights = self.ema.full_state_dict()  # collective under ZeRO-3
        if not dist.is_main():
            return
        from PIL import Image

        from .eval.images import grid, sample_images
        from .weights import model_from_weights
        t, e, mcfg = self.t, self.cfg.eval, self.mcfg
        if self.sampler_net is None:
            self.sampler_net = model_from_weights(mcfg, weights, self.device)
        else:
            self.sampler_net.load_state_dict(weights)
        labels = torch.arange(t.sample_n) % mcfg.num_classes if mcfg.num_classes else None
        self.log(f"step {self.step}: drawing {t.sample_n} EMA samples for the grid ({e.sampler} "
                 f"{e.steps} steps)")
        imgs = sample_images(self.sampler_net, self.diffusion, mcfg, list(range(t.sample_n)),
                             space=self.cfg.data.space, device=self.device, sampler=e.sampler,
                             steps=e.steps, eta=e.eta, labels=labels, batch=max(t.sample_n, 1),
                             autocast_dtype=self.sample_autocast)
        out = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        g = grid(imgs)
        Image.fromarray(g).save(out)
        self.tracker.log_image(g, f"samples/step_{self.step:08d}.png")

    def _fid(self) -> None:
        self.log(f"step {self.step}: computing FID-{self.cfg.eval.fid_samples} of the EMA "
                 f"weights")
        weights = self.ema.full_state_dict()
        t0 = time.perf_counter()
        value = self.fid_eval(weights, self.step, autocast_dtype=self.sample_autocast)
        self.last_fid.update(step=self.step, value=value)
        if dist.is_main():
            e = self.cfg.eval
            self.tracker.log_metrics({"fid": value, "train_flops": self.train_flops}, self.step)
            self.log(f"step {self.step}: FID-{e.fid_samples} {value:.3f} ({e.sampler} {e.steps} "
                     f"steps, {time.perf_counter() - t0:.0f} s)")

    def _score(self) -> None:
        e = self.cfg.eval
        self.log(f"step {self.step}: scoring {e.score_samples} EMA samples (SWD"
                 f"{', held-out loss' if e.heldout else ''})")
        weights = self.ema.full_state_dict()
        metrics = self.score_eval(weights, self.step, autocast_dtype=self.sample_autocast)
        self.last_score = self.step
        if dist.is_main():
            self.tracker.log_metrics({**metrics, "train_flops": self.train_flops}, self.step)
            held = (f", held-out loss {metrics['heldout_loss']:.4f}"
                    if "heldout_loss" in metrics else "")
            self.log(f"step {self.step}: SWD x1e3 patches {metrics['swd_patch']:.2f}, images "
                     f"{metrics['swd_image']:.2f}{held} ({metrics['score_seconds']:.0f} s)")

    def _finish_upload(self, say: bool = True) -> None:
        """Wait for the checkpoint upload in progress (a run folder in a bucket)."""
        if not self.store.remote:
            return
        try:
            self.store.wait(self.log if say else None)
        except LeaseLost as e:
            raise TrainingStopped(str(e), EXIT_DATA) from None
        except RemoteError as e:
            raise TrainingStopped(f"checkpoint upload: {e}; the newest committed checkpoint in "
                                  f"{self.store.url} is the one to resume from", EXIT_DATA) \
                from None

    def _last_good(self) -> str:
        where = f"{self.ckpt_root / self.last_ckpt}" if self.last_ckpt else "none was written yet"
        return f" The last good checkpoint: {where}; `--resume auto` continues from it."

    def _check_space(self) -> None:
        """Say early how many more checkpoints fit on the checkpoint disk (at the first save, and
        again whenever fewer than two do)."""
        import shutil as _shutil
        if not dist.is_main():
            return
        free = _shutil.disk_usage(self.ckpt_root).free
        fits = int(free // max(self.ckpt_bytes, 1))
        first = not getattr(self, "_space_said", False)
        if first or fits < 2:
            self._space_said = True
            msg = (f"checkpoint disk {self.ckpt_root}: {_size(free)} free, a checkpoint "
                   f"takes {_size(self.ckpt_bytes)}: room for {fits} more (train.keep_last="
                   f"{self.t.keep_last} of them are kept)")
            if fits < 2:
                msg = "warning: " + msg + "; free space or lower train.keep_last"
            self.log(msg, file=sys.stderr) if fits < 2 else self.log(msg)

    def _nonfinite_message(self) -> str:
        where = f"{self.ckpt_root / self.last_ckpt}" if self.last_ckpt else "none was written yet"
        return (f"non-finite loss (NaN/Inf) detected by step {self.step}; stopped without "
                f"saving. The last good checkpoint: {where}. Lower optim.lr, raise "
                f"optim.warmup_steps or use train.precision=fp16 (which skips overflowing "
                f"steps), then `--resume auto`.")

    # ------------------------------------------------------------------ phase 6: finish
    def _finish(self) -> None:
        """After the last step: final samples, FID and the exported EMA weights."""
        self._sample_grid()
        if self.score_eval is not None and self.last_score != self.step:
            self._score()
        if self.fid_eval is not None and self.last_fid["step"] != self.step:
            self._fid()
        if dist.is_main():
            from .export import export_weights
            self.log(f"exporting the EMA weights to {self.run_dir / 'export'}"
                     + (" and logging them as an MLflow model" if self.tracker.enabled else ""))
            export_dir = export_weights(self.ckpt_root / self.last_ckpt, self.run_dir / "export")
            mcfg = dataclasses.asdict(self.mcfg)
            params = {**{f"model.{k}": v for k, v in mcfg.items()},
                      "diffusion.schedule": self.cfg.diffusion.schedule,
                      "diffusion.num_timesteps": self.cfg.diffusion.num_timesteps,
                      "data.space": self.cfg.data.space, "image_size": self.reader.image_size,
                      "train.stage": self.t.stage, "step": self.step,
                      "train_flops": self.train_flops}
            self.tracker.log_model(export_dir, name=f"maskdm-{self.t.stage}", step=self.step,
                                   params=params,
                                   metrics=["loss", "train_flops", "fid", "swd_patch",
                                            "swd_image", "heldout_loss"],
                                   register_as=self.cfg.tracking.register_model)
        if self.store.remote:
            self.log(f"uploading the last checkpoint, the export and the samples to "
                     f"{self.store.url}")
            self._finish_upload(say=False)
            if dist.is_main():
                try:
                    for sub in ("export", "samples"):
                        self.store.upload_tree(sub)
                except LeaseLost as e:
                    raise TrainingStopped(str(e), EXIT_DATA) from None

    def _summary(self, delivered: bool) -> dict:
        from .tracking import ui_command
        where = self.store.url or str(self.run_dir)  # a bucket run: its files are there
        summary = {"exit_code": 0, "step": self.step, "run_id": self.run_id,
                   "run_dir": where, "checkpoint": f"{where}/checkpoints/{self.last_ckpt}",
                   "samples": f"{where}/samples/step_{self.step:08d}.png",
                   "tracking_uri": self.tracker.uri, "tracking_ok": delivered,
                   "fid": self.last_fid["value"]}
        replaced, left_out = int(dist.all_sum(self.loader.skipped_samples)), self.reader.excluded
        if replaced or left_out:
            seen = ", ".join(self.loader.damaged_shards)
            self.log(f"data: {len(left_out)} damaged shard(s) left out of the order, {replaced} "
                     f"damaged sample(s) replaced" + (f" (found in {seen})" if seen else "")
                     + f"; run `maskdm shard --verify {self.reader.location}`")
        eid = self.tracker.experiment_id
        if self.device.type == "cuda":
            self.log(f"peak GPU memory allocated by torch: "
                     f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
        self.log(f"done: {self.t.steps} steps; checkpoint {summary['checkpoint']}; samples "
                 f"{summary['samples']}" + (f"; MLflow run {self.run_id}: "
                                            f"{ui_command(self.tracker.uri, eid)}"
                                            if self.tracker.enabled else ""))
        return summary

    def _print(self, *args, file=None, **kwargs) -> None:
        """Rank 0 prints; while the progress bar is drawn, above it (tqdm's write path), never
        glued to it."""
        if not dist.is_main():
            return
        args = tuple(redact_url(str(a)) for a in args)  # never a credential inside a URL
        if self.bar is not None and not self.bar.disable:
            self.bar.write(" ".join(str(a) for a in args), file=file or sys.stdout)
            sys.stdout.flush()
        else:
            print(*args, file=file or sys.stdout, flush=True, **kwargs)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.store.release()  # the re-queued (or next) job may write the folder at once

    def _run(self) -> dict:
        from tqdm import tqdm

        from maskdm.console import show_progress
        if self.finished:
            where = self.store.url or str(self.run_dir)
            self.log(f"{where} already finished: step {self.resume_meta.step} of {self.t.steps}, "
                     f"weights exported to {where}/export; nothing to do (raise train.steps to "
                     f"train on, or choose a new train.run_dir)")
            return {"exit_code": 0, "step": self.resume_meta.step,
                    "run_id": self.resume_meta.mlflow_run_id, "run_dir": where,
                    "checkpoint": str(self.resume_from), "already_finished": True}
        self._build()
        self._restore()
        self.log(self.loader.describe())
        self._start_tracking()
        handlers = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        self.bar = tqdm(total=self.t.steps, initial=self.step, unit="step", desc=self.t.stage,
                        dynamic_ncols=True, file=sys.stderr,
                        disable=not (dist.is_main() and show_progress()))
        status, code, message = "FINISHED", 0, ""
        try:
            self._loop()
            self._finish()
        except TrainingStopped as e:
            status = "FAILED" if e.code in (EXIT_NONFINITE, EXIT_DATA, EXIT_DISK_FULL) \
                else "KILLED"
            code, message = e.code, str(e)
            if self.store.remote and e.code != EXIT_DATA:
                try:  # the last good checkpoint must be committed before the process ends
                    self.store.wait(self.log)
                except RemoteError as err:
                    message += f" (its upload failed: {err})"
        except BaseException as e:  # a crash: the MLflow run must not stay RUNNING
            self.tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                                timeout=30)
            raise
        finally:
            self.bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.loader.close()
            if getattr(self, "trace", None) is not None:
                self.trace.close()
        delivered = self.tracker.finish(status)
        self.run_id = self.tracker.run_id or self.run_id
        if code:
            self.log(message, file=sys.stderr)
            return {"exit_code": code, "step": self.step, "run_id": self.run_id}
        summary = self._summary(delivered)
        if self.store.remote and not self.t.keep_scratch:
            self._remove_scratch()
        return summary

    def _remove_scratch(self) -> None:
        """After a run in a bucket finished and everything is uploaded: this node's local copy
        and conversions are removed (``train.keep_scratch`` keeps them)."""
        dist.barrier()  # every rank of the node is done with the copy
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if dist.launch_local_rank() != 0:
            return
        for p in (self.store.local.parent, self.scratch / "universal"):
            shutil.rmtree(p, ignore_errors=True)
        try:
            self.scratch.rmdir()  # only if nothing else (another node's copy) is in it
        except OSError:
            pass
        self.log(f"removed this node's local copy of the run ({self.store.local.parent}; "
                 f"train.keep_scratch=true keeps it)")


def scratch_root() -> Path:
    """This user's folder for maskdm's scratch folders: ``$TMPDIR/maskdm-<uid>``."""
    import tempfile
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"maskdm-{uid}"


def default_scratch(run_dir: str) -> Path:
    """This node's local working folder for a run (universal-checkpoint conversions, the local
    copy of a run folder in a bucket): under this user's private folder in the system's
    temporary folder (``scratch_root``), one per run."""
    import hashlib

    from maskdm.shardformat.remote import is_remote
    where = str(run_dir).rstrip("/") if is_remote(run_dir) else str(Path(run_dir).resolve())
    key = hashlib.sha256(where.encode()).hexdigest()[:12]
    name = where.rsplit("/", 1)[-1] or "run"
    return scratch_root() / "scratch" / f"{name}-{key}"


def private_scratch(scratch_dir: str | None, run_dir: str) -> Path:
    """The run's scratch folder, made private to this user (0700) and refused if another user
    owns it (``train.scratch_dir``, or the default under ``scratch_root``). Raises ConfigError."""
    from maskdm.shardformat.fsutil import NotPrivate, private_folder
    try:
        if scratch_dir:
            return private_folder(scratch_dir, "train.scratch_dir")
        private_folder(scratch_root(), "train.scratch_dir", tighten=True)
        return private_folder(default_scratch(run_dir), "train.scratch_dir")
    except NotPrivate as e:
        raise ConfigError(f"scratch folder: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot create the scratch folder ({e}); set train.scratch_dir to a "
                          f"writable local folder") from None


def _size(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_full_message(e: BaseException, folder: Path, step: int,
                      needed: int | None = None) -> str | None:
    """One line for a save that ran out of disk space (torch reports it as a RuntimeError from
    its zip writer: "unexpected pos"), else None."""
    import errno
    import shutil as _shutil
    text = str(e)
    if not ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text
            or "unexpected pos" in text or "file write failed" in text):
        return None
    try:
        free = _shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = 0
    need = f", a checkpoint takes {_size(needed)}" if needed else ""
    return (f"disk full: the checkpoint of step {step} did not fit in {folder} "
            f"({_size(free)} free{need}); its partial folder was removed. Free space "
            f"(or lower train.keep_last, or point train.run_dir at a larger disk).")


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all gradients of ``module``, on the device (no host sync)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.full((), float("nan"))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "mlflow", "pywt", "numpy"):
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
