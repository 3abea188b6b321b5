"""Training objectives. They own no parameters: ``loss = objective(net, batch, keep_idx, t, noise)``.

MSM (masked score matching): the eps-MSE over the visible patches only; the network sees only the
visible tokens. DSM (denoising score matching) is the same with ``keep_idx=None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion
from .uvit import gather_tokens, group_tokens, patchify, token_valid


class DiffusionObjective:
    def __init__(self, diffusion: GaussianDiffusion, patch_size: int,
                 group_channels: tuple[int, ...] | None = None):
        """``group_channels``: the model's token groups (``ModelConfig.group_channels``); with
        more than one (``dwt_tokens: split``) the MSM target tokens are built group by group, as
        the model builds its own, and the loss averages only their real (unpadded) values."""
        self.diffusion = diffusion
        self.patch_size = patch_size
        self.groups = tuple(group_channels) if group_channels and len(group_channels) > 1 else None

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
        elif self.groups is None:
            target = gather_tokens(patchify(noise, self.patch_size), keep_idx)
        else:
            target = gather_tokens(group_tokens(noise, self.patch_size, self.groups), keep_idx)
            valid = gather_tokens(token_valid(noise.shape[-1] // self.patch_size,
                                              self.patch_size, self.groups, noise.device)
                                  .expand(len(noise), -1, -1), keep_idx)
            err = (pred.float() - target.float()) ** 2
            return (err * valid).sum() / valid.sum()
        return F.mse_loss(pred.float(), target.float())
