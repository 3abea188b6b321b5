"""Held-out denoising loss: how well a model predicts the noise on images it never trained on.

The eps-MSE of the full (unmasked) model on a fixed set of held-out images, at a fixed grid of
timesteps, with fixed noise: image ``i`` at grid point ``k`` is noised with the generator seeded by
``mix(seed, i, k)``. The same model therefore always gets the same number, and two models scored on
the same held-out set, grid and seed are compared on exactly the same noisy inputs. It needs no
sampling (one forward pass per image and timestep) and no downloaded weights. It is a relative
measure: lower is better, only between models of the same data space and resolution.
"""

from __future__ import annotations

import numpy as np
import torch

from maskdm.pipeline.randomness import mix

DEFAULT_GRID = (25, 100, 250, 500, 750, 900)


@torch.no_grad()
def heldout_loss(net, diffusion, x0: torch.Tensor, *, grid=DEFAULT_GRID, seed: int = 0,
                 batch: int = 64, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Model-space held-out images ``x0`` [N, C, H, W] (on the model's device) -> ``loss`` (the
    mean over images and grid points) and ``loss_t<t>`` per timestep."""
    device = x0.device
    n = len(x0)
    per_t = {}
    was_training = net.training
    net.eval()
    try:
        for k, t in enumerate(grid):
            total = 0.0
            for lo in range(0, n, batch):
                hi = min(lo + batch, n)
                noise = torch.stack([_noise(x0.shape[1:], int(mix(seed, i, k)), device)
                                     for i in range(lo, hi)])
                tt = torch.full((hi - lo,), int(t), dtype=torch.long, device=device)
                x_t = diffusion.q_sample(x0[lo:hi], tt, noise)
                eps = net(x_t, tt, None, None if labels is None else labels[lo:hi]).float()
                total += torch.sum((eps - noise) ** 2).item()
            per_t[f"loss_t{t}"] = total / (n * x0[0].numel())
    finally:
        net.train(was_training)
    return {"loss": float(np.mean(list(per_t.values()))), **per_t}


def _noise(shape, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(shape), generator=g).to(device)
