"""Weight-free metrics during training (``eval.score_every``), logged to MLflow like ``fid``:

- ``swd_patch`` / ``swd_image`` (x 1e3): ``eval.score_samples`` images drawn with the EMA weights
  (fixed seeds, the ``eval`` sampler settings) against the first images of ``eval.score_ref``
  (default: ``data.shards``);
- ``heldout_loss``: the EMA model's eps-MSE on the first ``eval.heldout_n`` images of
  ``eval.heldout`` (a shard folder the run does not train on), at fixed timesteps with fixed noise.

Rank 0 computes both (the other ranks wait): simple, and cheap at the sizes these metrics need.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import dist


def check(cfg) -> None:
    """Config-time check: the reference and held-out folders exist."""
    from ..config import ConfigError
    e = cfg.eval
    if not e.score_every:
        return
    from maskdm.shardformat.fsutil import url_refusal
    for key, value in (("eval.score_ref", e.score_ref), ("eval.heldout", e.heldout)):
        if value and (refused := url_refusal(value, key, remote_ok=True)) is not None:
            raise ConfigError(refused)
    from maskdm.shardformat.remote import is_remote
    ref = e.score_ref or cfg.data.shards
    if not is_remote(ref) and not Path(ref).exists():
        raise ConfigError(f"eval.score_ref: {ref} does not exist")
    if e.heldout and not is_remote(e.heldout) and not (Path(e.heldout) / "manifest.json").exists():
        raise ConfigError(f"eval.heldout: {e.heldout} is not a shard folder (no manifest.json)")
    if e.score_samples < 2:
        raise ConfigError("eval.score_samples must be >= 2")


class TrainingScore:
    def __init__(self, cfg, mcfg, diffusion, device, log=print):
        self.cfg, self.mcfg, self.diffusion = cfg, mcfg, diffusion
        self.device, self.log = device, log
        self.ref = self.heldout = None
        self.generator = None
        if not dist.is_main():
            return
        from .score import load_images
        e = cfg.eval
        self.ref = load_images(e.score_ref or cfg.data.shards, e.score_samples)
        if e.heldout:
            from maskdm.pipeline.data.transform import to_model_space
            images = load_images(e.heldout, e.heldout_n)
            self.heldout = to_model_space(torch.from_numpy(images), "jpeg", None, cfg.data.space,
                                          device)

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor], step: int,
                 autocast_dtype=None) -> dict[str, float] | None:
        """Collective (every rank calls it): -> the metrics on rank 0, None elsewhere."""
        out = None
        if dist.is_main():
            out = self._score(weights, step, autocast_dtype)
        dist.barrier()
        return out

    def _score(self, weights, step, autocast_dtype) -> dict[str, float]:
        import numpy as np

        from .heldout import heldout_loss
        from .sample_folder import draw, training_sampler
        from .swd import swd_scores
        e = self.cfg.eval
        self.generator = training_sampler(self.generator, self.mcfg, self.diffusion,
                                          self.cfg.data.space, weights, step, self.device)
        t0 = time.perf_counter()
        n, b = len(self.ref), e.batch
        imgs = np.concatenate([draw(self.generator, list(range(k, min(n, k + b))), seed=e.fid_seed,
                                    sampler=e.sampler, steps=e.steps, eta=e.eta,
                                    autocast_dtype=autocast_dtype) for k in range(0, n, b)])
        s = swd_scores(imgs, self.ref, seed=e.fid_seed)
        metrics = {"swd_patch": s["swd_patch"], "swd_image": s["swd_image"]}
        if self.heldout is not None:
            metrics["heldout_loss"] = heldout_loss(self.generator.net, self.diffusion,
                                                   self.heldout, seed=e.fid_seed,
                                                   batch=b)["loss"]
        metrics["score_seconds"] = time.perf_counter() - t0
        return metrics
