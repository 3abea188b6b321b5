"""FID during training: reference statistics once, then every ``eval.fid_every`` steps sample
``eval.fid_samples`` images with the EMA weights on all ranks, sum the feature statistics with one
all-reduce, and let rank 0 compute the distance (logged to MLflow as ``fid``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from maskdm.shardformat.remote import is_remote

from .. import dist
from .fid import (
    Accumulator,
    FIDError,
    FIDStats,
    features,
    frechet_distance,
    is_shard_folder,
    shard_stats,
    stats_path,
)
from .inception import MissingWeights, find_weights, load_inception


def check(cfg) -> Path | None:
    """Config-time check (before the engine starts): the weights and the reference exist."""
    from ..config import ConfigError
    e = cfg.eval
    if not e.fid_every:
        return None
    try:
        path = find_weights(e.inception_weights)
    except MissingWeights as err:
        raise ConfigError(f"eval.fid_every={e.fid_every} needs the FID Inception weights: "
                          f"{err}") from None
    ref = e.fid_ref or cfg.data.shards
    from maskdm.shardformat.fsutil import url_refusal
    if (refused := url_refusal(ref, "eval.fid_ref", remote_ok=True)) is not None:
        raise ConfigError(refused)
    if not is_remote(ref) and not Path(ref).exists():
        raise ConfigError(f"eval.fid_ref: {ref} does not exist")
    return path


class TrainingFID:
    def __init__(self, cfg, mcfg, diffusion, device, weights_path: Path, log=print):
        self.cfg, self.mcfg, self.diffusion, self.device = cfg, mcfg, diffusion, device
        self.log = log
        self.net, self.feature_id = load_inception(weights_path, device)
        self.ref = self._reference(cfg.eval.fid_ref or cfg.data.shards)
        self.generator = None  # the EMA model, built on the first evaluation

    def _reference(self, ref: str) -> FIDStats | None:
        """Collective. Returns the statistics on rank 0, None elsewhere."""
        batch = self.cfg.eval.batch
        if is_shard_folder(ref):
            path = stats_path(ref, self.feature_id)
            exists = dist.broadcast_object(path.exists() if dist.is_main() else None)
            if not exists:
                self.log(f"FID: computing reference statistics of {ref} on "
                         f"{dist.world_size()} rank(s) (stored as {path}; done once)")
                stats = shard_stats(self.net, self.feature_id, ref, batch=batch,
                                    device=self.device, rank=dist.rank(),
                                    world=dist.world_size(), progress=dist.is_main())
                if dist.is_main():
                    stats.save(path)
                dist.barrier()
            return FIDStats.load(path) if dist.is_main() else None
        if not dist.is_main():
            return None
        from .fid import reference_stats
        try:
            return reference_stats(ref, self.net, self.feature_id, batch=batch,
                                   device=self.device, progress=False)
        except FIDError as e:
            print(f"error: eval.fid_ref: {e}", file=sys.stderr)
            raise

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor], step: int, autocast_dtype=None):
        """Collective: every rank passes the full EMA weights. -> FID on rank 0, else None."""
        from .sample_folder import draw, training_sampler
        e = self.cfg.eval
        self.generator = training_sampler(self.generator, self.mcfg, self.diffusion,
                                          self.cfg.data.space, weights, step, self.device)
        n, b = e.fid_samples, e.batch
        rank, world = dist.rank(), dist.world_size()
        acc = Accumulator(self.net.feature_dim)
        for k in range(rank, (n + b - 1) // b, world):
            imgs = draw(self.generator, list(range(k * b, min(n, (k + 1) * b))), seed=e.fid_seed,
                        sampler=e.sampler, steps=e.steps, eta=e.eta, autocast_dtype=autocast_dtype)
            acc.add(features(self.net, list(imgs), self.device))
        acc.all_reduce()
        if not dist.is_main():
            return None
        gen = acc.stats(self.feature_id, f"step {step}")
        return frechet_distance(gen.mu, gen.sigma, self.ref.mu, self.ref.sigma)
