"""Atomic, resumable checkpoints: DeepSpeed engine state + EMA + loader + RNG + config.

Layout under ``RUN_DIR/checkpoints``: ``step_00001000/`` holds DeepSpeed's files (model, optimizer,
LR schedule, ZeRO partitions), ``ema_rankNNNNN.pt`` (rank 0 only unless ZeRO-3 partitions it),
``rng_rankNNNNN.pt`` and ``meta.json`` (step, samples seen, loader state, world size, MLflow run,
resolved config). Every ``.pt`` file, ours and DeepSpeed's, is read with ``torch.load(...,
weights_only=True)`` (see ``safe_torch_load``; DeepSpeed's universal conversion too, through
``universal_convert``): a shared checkpoint cannot run code. Every rank
writes into ``.tmp-step_...``; after a barrier rank 0 writes ``meta.json`` and renames the folder,
so a checkpoint exists only once it is complete: a crash while saving leaves the previous one
usable. The newest ``keep_last`` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdm.shardformat.fsutil import atomic_write_json, fsync_dir

from . import dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json`` of a checkpoint: everything needed to resume it, sample from it or export it
    without building the training config again."""

    step: int
    loader: dict[str, int]  # Loader.state_dict(): seed, samples_seen, global_batch, partitions,
    # window (the last two since 0.3: without them, the one-partition order of 0.2)
    world_size: int
    zero_stage: int
    precision: str  # bf16 | fp16 | fp32
    stage: str  # pretrain | finetune
    config: dict[str, dict[str, Any]]  # the resolved training config (Config.to_dict())
    model: dict[str, Any]  # the resolved ModelConfig
    image_size: int
    space: str  # dwt | pixel
    mlflow_run_id: str | None = None
    time: float = 0.0
    # Cumulative training FLOPs up to this step, those of the init_from chain included (None in
    # checkpoints of maskdm 0.2.x: derived from step, model, mask and batch by cumulative_flops).
    train_flops: float | None = None

    @property
    def diffusion(self) -> dict[str, Any]:
        return self.config["diffusion"]

    @property
    def samples_seen(self) -> int:
        return int(self.loader["samples_seen"])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)}: not a checkpoint written "
                                  f"by this version of maskdm")
        return cls(**{k: v for k, v in data.items() if k in names})


def cumulative_flops(meta: CheckpointMeta) -> float:
    """Training FLOPs that produced the checkpoint of ``meta`` (pre-training included when
    recorded; a checkpoint that predates the record counts its own run only)."""
    if meta.train_flops is not None:
        return float(meta.train_flops)
    from maskdm.model.config import ModelConfig
    from maskdm.model.flops import step_flops
    from maskdm.model.masks import MaskSpec
    c = meta.config
    return float(meta.step * step_flops(ModelConfig(**meta.model), MaskSpec(**c["mask"]),
                                        int(c["train"]["global_batch"])))


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, a ``checkpoints`` folder or a run folder -> one checkpoint folder.
    A run or checkpoint in a bucket (s3://, gs://): its newest committed checkpoint's meta and
    EMA weights, downloaded into the local cache (``runstore.fetch_weights``)."""
    from maskdm.shardformat.remote import is_remote
    if is_remote(path):
        from .runstore import fetch_weights
        try:
            return fetch_weights(str(path))
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(str(e)) from None
    p = Path(path).expanduser()
    if (p / "meta.json").exists():
        return p
    for root in (p / "checkpoints", p):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no complete checkpoint at {p} (expected a step_NNNNNNNN folder with "
                          f"meta.json, or a run folder holding checkpoints/)")


def _deepspeed_state_classes() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer states (loss scaler, ZeRO stage
    enum, fragment addresses): allowed for ``weights_only`` loading, nothing else is."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_torch_load():
    """While active, every ``torch.load`` (also inside DeepSpeed, which passes
    ``weights_only=False``) unpickles with ``weights_only=True``: tensors, containers, numbers,
    strings and DeepSpeed's few plain-data classes only. A file that needs anything else (a
    tampered checkpoint: pickled code) fails with ``CheckpointError``."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln),
                       first[0] if first else "")
            raise CheckpointError(
                f"refusing to load {f}: it holds pickled objects that are not plain tensors or "
                f"data ({why.strip()[:200]}). maskdm loads checkpoints with torch.load("
                f"weights_only=True) so that a checkpoint cannot run code; this file was written "
                f"by something else or tampered with") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            yield
    finally:
        torch.load = original


def load_pt(path: str | os.PathLike):
    """``torch.load`` of one of our files, on the CPU, with ``weights_only=True``."""
    with safe_torch_load():
        return torch.load(path, map_location="cpu")


def place_steps(opt: torch.optim.Optimizer) -> None:
    """After DeepSpeed's universal load: every parameter its own ``step`` tensor (DeepSpeed shares
    one), where torch's Adam expects it: on the parameter's device for the fused and capturable
    kernels (CUDA runs use ``AdamW(fused=True)``; the converter read the step on the CPU, and
    ``load_state_dict``, which would move it, is bypassed), on the CPU otherwise."""
    # (the state is keyed by the tensors the optimizer steps, which under ZeRO are not always
    # the ones its param_groups list after a load: every state is visited, keyed by itself)
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for p, state in opt.state.items():
        if not torch.is_tensor(state.get("step")):
            continue
        step = state["step"].detach().clone()
        state["step"] = step.to(p.device) if on_device and torch.is_tensor(p) else step.cpu()


def rng_state() -> dict:
    """This process's RNG states as tensors and plain data (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached},
            "python": random.getstate(),
            # this rank's own device only: a resume may see fewer devices per process
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def cuda_state_for(saved, device_index: int):
    """The CUDA RNG state to restore on device ``device_index`` from a checkpoint's: its one
    state (0.3.1 on), or, from the list of every visible device that older checkpoints hold,
    that device's (the last one if the list is shorter: a resume that sees more devices per
    process); None if there is none."""
    if saved is None:
        return None
    if torch.is_tensor(saved):
        return saved
    saved = list(saved)
    if not saved:
        return None
    return saved[min(device_index, len(saved) - 1)]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        own = cuda_state_for(state["cuda"], torch.cuda.current_device())
        if own is not None:
            torch.cuda.set_rng_state(own)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def save(engine, ema, root: str | os.PathLike, meta: CheckpointMeta, keep_last: int, *,
         node_local: bool = False) -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint folder. ``node_local``:
    ``root`` is on each node's own disk (a run folder in a bucket): each node commits its copy
    (local rank 0), not rank 0 alone."""
    root = Path(root)
    name = tag(meta.step)
    tmp, final = root / f".tmp-{name}", root / name
    committer = int(os.environ.get("LOCAL_RANK", "0")) == 0 if node_local else dist.is_main()
    if committer:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    ema.sync()  # ZeRO 1/2 under bf16/fp16: each rank updated its slice; rank 0 writes the whole
    error = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        rank = dist.rank()
        if ema.zero3 or dist.is_main():
            torch.save(ema.state_dict(), tmp / f"ema_rank{rank:05d}.pt")
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:  # a full disk, mostly: no partial folder stays behind
        error = e
    if dist.any_rank(error is not None):
        if committer:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise error or CheckpointError(f"another rank could not write its part of {name}")
    dist.barrier()
    if committer:
        atomic_write_json(tmp / "meta.json", meta.to_json())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(ckpt: Path) -> CheckpointMeta:
    try:
        data = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json is unreadable ({e})") from None
    return CheckpointMeta.from_json(data, f"{ckpt}/meta.json")


def needs_universal(meta: CheckpointMeta, world: int) -> bool:
    """Resuming ``meta``'s checkpoint on ``world`` ranks needs its ZeRO partitions re-cut (ZeRO 0
    keeps whole optimizer states: any world size loads them as they are)."""
    return meta.world_size != world and meta.zero_stage > 0


def universal_copy(ckpt: Path, scratch: Path) -> Path:
    """Collective. ``ckpt`` converted by DeepSpeed's own universal-checkpoint tool
    (``deepspeed.checkpoint.ds_to_universal``: every ZeRO partition merged into whole
    per-parameter states that any world size can load) into ``scratch`` -> the folder holding the
    converted ``step_*`` tag. Local rank 0 of every node converts into its node's scratch folder
    (kept for a later resume of the same checkpoint); the other ranks wait."""
    import hashlib
    import subprocess
    import sys
    import time
    # the folder's path and its meta.json (step, time, world size): a later checkpoint written
    # under the same name is another conversion
    key = hashlib.sha256(str(ckpt.resolve()).encode() + (ckpt / "meta.json").read_bytes()
                         ).hexdigest()[:12]
    parent = scratch / "universal" / key
    out = parent / ckpt.name
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (out / "DONE").exists():
        tmp = parent / f".tmp-{ckpt.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log = parent / f"{ckpt.name}.convert.log"
        t0 = time.time()
        workers = str(max(1, min(4, os.cpu_count() or 1)))
        with open(log, "w") as f:
            # DeepSpeed's converter, every torch.load in it weights_only (universal_convert.py)
            r = subprocess.run([sys.executable, "-m", "maskdm.pipeline.universal_convert",
                                "--input_folder", str(ckpt), "--output_folder", str(tmp),
                                "--inject_missing_state", "--num_extract_workers", workers,
                                "--num_merge_workers", workers], stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = log.read_text()[-1500:]
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"DeepSpeed's universal-checkpoint conversion of {ckpt} failed "
                                  f"(exit {r.returncode}; its log: {log}):\n{tail}")
        (tmp / "DONE").write_text(f"{time.time() - t0:.1f}\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return parent


def conversion_seconds(universal: Path, tag_name: str) -> float | None:
    try:
        return float((universal / tag_name / "DONE").read_text())
    except (OSError, ValueError):
        return None


def load(engine, ema, ckpt: Path, universal: Path | None = None) -> CheckpointMeta:
    """Collective: restore engine, EMA and this rank's RNG from ``ckpt``; returns its meta.
    ``universal``: the folder of its universal copy (``universal_copy``), needed when the world
    size changed under ZeRO 1-3; the engine must then have been built with
    ``checkpoint.load_universal``."""
    meta = read_meta(ckpt)
    world = dist.world_size()
    if needs_universal(meta, world) and universal is None:
        raise CheckpointError(f"{ckpt} was written by {meta.world_size} ranks with ZeRO "
                              f"stage {meta.zero_stage}; this run has {world}: its partitions "
                              f"must be converted first (universal_copy)")
    groups = _group_settings(engine)
    with safe_torch_load():
        path, _ = engine.load_checkpoint(str(universal or ckpt.parent), tag=ckpt.name,
                                         load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    if universal is not None:
        # DeepSpeed 0.19's universal load under ZeRO-3 gives every parameter group the first
        # group's settings (weight decay on norms and biases too) and one shared `step` tensor
        # (advanced once per group per step): put the configured settings back, unshare steps
        opt = _optimizer(engine)
        for g, settings in zip(opt.param_groups, groups):
            g.update(settings)
        place_steps(opt)
    rank = dist.rank()
    if ema.zero3 and meta.world_size != world:  # partitions of another world: merged, re-cut
        ema.load_full(load_ema_weights(ckpt)[0])
    else:
        ema_file = ckpt / f"ema_rank{rank if ema.zero3 else 0:05d}.pt"
        ema.load_state_dict(load_pt(ema_file))
    rng_file = ckpt / f"rng_rank{rank:05d}.pt"
    if rng_file.exists():
        try:
            set_rng_state(load_pt(rng_file))
        except CheckpointError as e:
            raise CheckpointError(f"{e}. Checkpoints of maskdm 0.2.0 and older pickle the numpy "
                                  f"RNG state: delete {ckpt}/rng_rank*.pt to resume without "
                                  f"restoring the global RNGs (the training draws come from "
                                  f"the seed and step, not from them)") from None
    return meta


def _optimizer(engine):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, fp16/bf16)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _group_settings(engine) -> list[dict]:
    """Each parameter group's settings that come from the config (not the LR schedule)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
            for g in _optimizer(engine).param_groups]


def load_ema_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Full EMA weights (fp32, CPU) and meta of a checkpoint, merging ZeRO-3 partitions."""
    from .ema import merge_partitions
    meta = read_meta(ckpt)
    files = sorted(ckpt.glob("ema_rank*.pt"))
    if not files:
        raise CheckpointError(f"{ckpt} holds no EMA weights (ema_rank*.pt)")
    states = [load_pt(f) for f in files]
    if states[0]["zero3"] and len(states) != meta.world_size:
        raise CheckpointError(f"{ckpt}: ZeRO-3 EMA needs {meta.world_size} partition files, "
                              f"found {len(states)}")
    return merge_partitions(states), meta
