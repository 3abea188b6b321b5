"""``maskdm sample``: a trained model -> a folder of PNGs, sharded across ranks and resumable.

Image ``i`` is drawn from the seed ``image_seed(seed, i)`` and always computed in the same batch
(batch ``i // batch``), so a given (model, seed, sampler, steps, eta, batch) produces the same
pixels whatever the number of ranks. Batches go round-robin to ranks; each PNG is written to a
temporary name and renamed, so an interrupted run leaves only complete images, and a rerun
computes only the batches that still miss an image. ``sampling.json`` records the settings; a
rerun with different settings is refused instead of mixing two sample sets.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskdm.model import ModelConfig
from maskdm.model.diffusion import GaussianDiffusion
from maskdm.pipeline.randomness import image_seed
from maskdm.shardformat.fsutil import atomic_write_bytes, atomic_write_json, remove_stale_tmp

from .. import checkpoint as ckpt
from .. import dist

PNG = re.compile(r"^(\d{6,})\.png$")


class SampleError(RuntimeError):
    pass


@dataclass
class SamplingModel:
    net: torch.nn.Module
    mcfg: ModelConfig
    diffusion: GaussianDiffusion
    space: str
    image_size: int
    source: str  # resolved checkpoint or export folder
    step: int
    weights: str  # ema | raw
    # the evaluation protocol of the run's recipe (eval.sampler/steps/eta/fid_samples), if known
    protocol: dict | None = None


def protocol_of(eval_cfg: dict | None) -> dict | None:
    if not eval_cfg:
        return None
    return {k: eval_cfg[k] for k in ("sampler", "steps", "eta", "fid_samples") if k in eval_cfg}


def _raw_weights(src: Path, meta: ckpt.CheckpointMeta) -> dict[str, torch.Tensor]:
    """The engine's (non-EMA) weights of a DeepSpeed checkpoint, as fp32 on the CPU."""
    if meta.zero_stage == 0:
        files = sorted(src.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise SampleError(f"{src} holds no mp_rank_*_model_states.pt")
        state = ckpt.load_pt(files[0])["module"]
        return {k: v.float() for k, v in state.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with ckpt.safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(src.parent), tag=src.name)
    return {k: v.float() for k, v in state.items()}


def load_sampling_model(path: str | os.PathLike, *, weights: str = "ema", device="cpu") -> SamplingModel:
    """An export folder (``maskdm export``), a checkpoint folder or a run folder -> SamplingModel."""
    from maskdm.shardformat.remote import is_remote

    from ..weights import model_from_weights
    if is_remote(path):  # a run or checkpoint in a bucket: its meta and EMA weights, cached
        if weights != "ema":
            raise SampleError(f"--weights {weights} needs the checkpoint's ZeRO partitions, which "
                              f"are not read from a bucket; use --weights ema")
        try:
            p = ckpt.resolve(str(path))
        except ckpt.CheckpointError as e:
            raise SampleError(f"--ckpt: {e}") from None
    else:
        p = Path(path).expanduser()
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        if weights != "ema":
            raise SampleError(f"{p} is an export, which holds EMA weights only; use --weights ema "
                              f"or point --ckpt at a training checkpoint")
        from ..export import load_export
        state, model_dict, conf = load_export(p)
        source, step, space, size = p.resolve(), conf["step"], conf["space"], conf["image_size"]
        diff, protocol = conf["diffusion"], protocol_of(conf.get("evaluation"))
    else:
        try:
            src = ckpt.resolve(p)
        except ckpt.CheckpointError as e:
            raise SampleError(f"--ckpt: {e}; or give an export folder made by `maskdm export`") \
                from None
        if weights == "ema":
            state, meta = ckpt.load_ema_weights(src)
        else:
            meta = ckpt.read_meta(src)
            state = _raw_weights(src, meta)
        model_dict, source, step = meta.model, src.resolve(), meta.step
        space, size, diff = meta.space, meta.image_size, meta.diffusion
        protocol = protocol_of(meta.config.get("eval"))
    mcfg = ModelConfig(**model_dict)
    net = model_from_weights(mcfg, state, device)
    return SamplingModel(net, mcfg, GaussianDiffusion(diff["schedule"], diff["num_timesteps"]),
                         space, size, str(source), int(step), weights, protocol)


def training_sampler(current: SamplingModel | None, mcfg: ModelConfig, diffusion, space: str,
                     weights: dict[str, torch.Tensor], step: int, device) -> SamplingModel:
    """The EMA model of a running training, for evaluations during it: built on the first call,
    then given the new ``weights`` in place."""
    if current is not None:
        current.net.load_state_dict(weights)
        return current
    from ..weights import model_from_weights
    size = mcfg.input_size * (2 if space == "dwt" else 1)
    return SamplingModel(model_from_weights(mcfg, weights, device), mcfg, diffusion, space, size,
                         "training", step, "ema")


def draw(gen: SamplingModel, idx: list[int], *, seed: int, sampler: str, steps: int, eta: float,
         class_label: int | None = None, autocast_dtype=None) -> np.ndarray:
    """Images ``idx`` of the sample set ``seed`` in one batch -> uint8 [len(idx), H, W, 3]. Image
    i uses the seed ``image_seed(seed, i)`` and, for conditional models, class ``i % num_classes``
    (or ``class_label``)."""
    from .images import sample_images
    nc = gen.mcfg.num_classes
    labels = torch.tensor([class_label if class_label is not None else i % nc for i in idx],
                          dtype=torch.long) if nc else None
    return sample_images(gen.net, gen.diffusion, gen.mcfg, [image_seed(seed, i) for i in idx],
                         space=gen.space, device=next(gen.net.parameters()).device,
                         sampler=sampler, steps=steps, eta=eta, batch=len(idx), labels=labels,
                         autocast_dtype=autocast_dtype)


def existing(out: Path) -> set[int]:
    return {int(m.group(1)) for p in out.iterdir() if (m := PNG.match(p.name))} \
        if out.is_dir() else set()


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _prepare_out(out: Path, settings: dict, n: int) -> set[int]:
    """Check/record the settings of ``out`` and clear interrupted writes -> indices present."""
    record = out / "sampling.json"
    out.mkdir(parents=True, exist_ok=True)
    prev_n = 0
    if record.exists():
        old = json.loads(record.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise SampleError(f"{out} holds samples made with other settings ("
                              + "; ".join(diff) + "); use another --out or delete it")
        prev_n = old.get("n", 0)
    elif existing(out):
        raise SampleError(f"{out} already holds PNGs but no sampling.json; use an empty folder")
    remove_stale_tmp(out)
    atomic_write_json(record, {**settings, "n": max(n, prev_n)})
    return existing(out)


def _check_request(gen: SamplingModel, n: int, steps: int, batch: int,
                   class_label: int | None) -> None:
    if n < 1 or batch < 1:
        raise SampleError("--n and --batch must be >= 1")
    if not 1 <= steps <= gen.diffusion.num_timesteps:
        raise SampleError(f"--steps must be in 1..{gen.diffusion.num_timesteps}")
    nc = gen.mcfg.num_classes
    if class_label is not None and not (nc and 0 <= class_label < nc):
        raise SampleError(f"--class {class_label}: the model has "
                          f"{f'{nc} classes (0..{nc - 1})' if nc else 'no class conditioning'}")


def _settings(gen: SamplingModel, *, sampler: str, steps: int, eta: float, seed: int, batch: int,
              precision: str, class_label: int | None) -> dict:
    """What ``sampling.json`` records: a rerun must match it exactly."""
    nc = gen.mcfg.num_classes
    return {"format": "maskdm-samples-v1", "source": gen.source, "step": gen.step,
            "weights": gen.weights, "sampler": sampler, "steps": steps, "eta": eta,
            "seed": seed, "batch": batch, "precision": precision,
            "labels": "none" if not nc else (f"class {class_label}" if class_label is not None
                                             else "index % num_classes"),
            "image_size": gen.image_size, "space": gen.space,
            "seeds": "image i uses image_seed(seed, i)"}


def sample_to_dir(gen: SamplingModel, out: str | os.PathLike, n: int, *, seed: int = 0,
                  sampler: str = "ddim", steps: int = 50, eta: float = 0.0, batch: int = 64,
                  class_label: int | None = None, precision: str = "auto",
                  progress: bool = True) -> dict:
    """Write images ``000000.png .. (n-1).png`` into ``out`` (collective under a launcher)."""
    out = Path(out)
    rank, world = dist.rank(), dist.world_size()
    device = next(gen.net.parameters()).device
    _check_request(gen, n, steps, batch, class_label)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    settings = _settings(gen, sampler=sampler, steps=steps, eta=eta, seed=seed, batch=batch,
                         precision=precision, class_label=class_label)
    error, done = None, set()
    if rank == 0:
        try:
            done = _prepare_out(out, settings, n)
        except (SampleError, OSError, ValueError) as e:
            error = str(e)
    # one listing for everyone, taken before any writing; an error stops every rank
    error, done = dist.broadcast_object((error, done))
    if error:
        raise SampleError(error)
    n_batches = (n + batch - 1) // batch
    todo = [k for k in range(n_batches)
            if any(i not in done for i in range(k * batch, min(n, (k + 1) * batch)))]
    mine = todo[rank::world]
    from tqdm import tqdm

    from maskdm.console import show_progress
    remaining = sum(min(n, (k + 1) * batch) - k * batch for k in todo)
    bar = tqdm(total=remaining, unit="img", desc="sampling", dynamic_ncols=True, file=sys.stderr,
               disable=not (progress and rank == 0 and show_progress()),
               mininterval=1.0)
    t0 = time.perf_counter()
    written = 0
    for k in mine:
        idx = list(range(k * batch, min(n, (k + 1) * batch)))
        imgs = draw(gen, idx, seed=seed, sampler=sampler, steps=steps, eta=eta,
                    class_label=class_label, autocast_dtype=autocast)
        for i, img in zip(idx, imgs):
            if i not in done:
                _write_png(out / f"{i:06d}.png", img)
                written += 1
        bar.update(min(len(idx) * world, bar.total - bar.n))
    bar.close()
    dist.barrier()
    total_written = int(dist.all_sum(written))
    have = existing(out)
    missing = [i for i in range(n) if i not in have]
    if missing and rank == 0:
        raise SampleError(f"{len(missing)} image(s) are still missing in {out} (e.g. "
                          f"{missing[:5]}); rerun the same command to complete it")
    return {"out": str(out), "n": n, "written": total_written, "skipped_existing": n - total_written,
            "seconds": time.perf_counter() - t0, "ranks": world}
