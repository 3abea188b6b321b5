"""Model-space samples -> images: batched seeded sampling, uint8 conversion and grids (used by the
training-time sample grids, ``maskdm sample`` and FID)."""

from __future__ import annotations

import math

import numpy as np
import torch

from maskdm.model import ModelConfig
from maskdm.model import dwt as tdwt
from maskdm.model.diffusion import GaussianDiffusion


def to_images(x: torch.Tensor, space: str) -> np.ndarray:
    """Model-space samples -> uint8 [B, H, W, 3]."""
    img = tdwt.image_from_model(x) if space == "dwt" else tdwt.image_from_pixels(x)
    return img.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_images(net, diffusion: GaussianDiffusion, mcfg: ModelConfig, seeds: list[int], *,
                  space: str, device, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                  batch: int = 64, labels: torch.Tensor | None = None,
                  autocast_dtype=None) -> np.ndarray:
    """One image per seed -> uint8 [N, H, W, 3]; each image depends only on its seed."""
    out = []
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        lab = labels[i:i + batch].to(device) if labels is not None else None
        x = diffusion.sample(net, (len(chunk), *shape), sampler=sampler, steps=steps, eta=eta,
                             seeds=chunk, device=device, labels=lab, autocast_dtype=autocast_dtype)
        out.append(to_images(x, space))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return canvas
