"""Training objectives. They own no parameters: ``loss = objective(net, batch, keep_idx, t, noise)``.

MSM (masked score matching): the eps-MSE over the visible patches only; the network sees only the
visible tokens. DSM (denoising score matching) is the same with ``keep_idx=None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion
from .uvit import gather_tokens, patchify


class DiffusionObjective:
    def __init__(self, diffusion: GaussianDiffusion, patch_size: int):
        self.diffusion = diffusion
        self.patch_size = patch_size

    def __call__(self, net, batch, keep_idx: torch.Tensor | None, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``batch`` (anything with ``.x0`` [B, C, H, W] and ``.labels``).

        ``t`` [B] and ``noise`` [B, C, H, W] come from ``maskdm.pipeline.randomness.draw_step`` in training.
        """
        x0 = batch.x0
        x_t = self.diffusion.q_sample(x0, t, noise.to(x0.dtype))
        pred = net(x_t, t, keep_idx, getattr(batch, "labels", None))
        if keep_idx is None:
            target = noise
        else:
            target = gather_tokens(patchify(noise, self.patch_size), keep_idx)
        return F.mse_loss(pred.float(), target.float())
