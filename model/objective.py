"""Training objectives. They own no parameters: ``loss = objective(net, batch, keep_idx, t, noise)``.

MSM (masked score matching): the eps-MSE over the visible patches only; the network sees only the
visible tokens. DSM (denoising score matching) is the same with ``keep_idx=None``.

With ``loss_weight="min_snr"`` each sample's eps-MSE is weighted by min(SNR_t, gamma) / SNR_t
(``GaussianDiffusion.min_snr_weight``; the MSM loss too, over its visible tokens), then averaged as
before: a uniform weight of 1 gives the plain loss exactly.

MaskDiT (a model with a decoder, ``ModelConfig.decoder_depth`` > 0): the decoder predicts every
token; the loss is the eps-MSE over the visible tokens plus ``mae_weight`` x an MAE-style
reconstruction loss over the masked tokens only: the MSE between the prediction and the masked
patches of the diffused input ``x_t``, each patch normalised to zero mean and unit variance (as
MaskDiT's ``norm_pix_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion
from .uvit import gather_tokens, group_tokens, patchify, token_valid


def masked_positions(keep_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, S] visible indices -> [B, N] bool, True where a token is masked."""
    masked = torch.ones(len(keep_idx), num_tokens, dtype=torch.bool, device=keep_idx.device)
    return masked.scatter(1, keep_idx, False)


def mae_loss(pred: torch.Tensor, x_t: torch.Tensor, keep_idx: torch.Tensor, p: int) -> torch.Tensor:
    """MSE over the masked tokens between ``pred`` [B, N, K] and the per-patch normalised patches
    of ``x_t``; the visible tokens do not count."""
    target = patchify(x_t.float(), p)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    per_token = ((pred.float() - target) ** 2).mean(-1)
    masked = masked_positions(keep_idx, target.shape[1]).float()
    return (per_token * masked).sum() / masked.sum().clamp_min(1)


class DiffusionObjective:
    def __init__(self, diffusion: GaussianDiffusion, patch_size: int,
                 group_channels: tuple[int, ...] | None = None, *, decoder: bool = False,
                 mae_weight: float = 0.0, loss_weight: str = "uniform",
                 min_snr_gamma: float = 5.0):
        """``group_channels``: the model's token groups (``ModelConfig.group_channels``); with
        more than one (``dwt_tokens: split``) the MSM target tokens are built group by group, as
        the model builds its own, and the loss averages only their real (unpadded) values.
        ``decoder``: the model predicts every token of a masked input (MaskDiT), ``mae_weight``
        the weight of the reconstruction loss on the masked ones. ``loss_weight``: "uniform" or
        "min_snr" (with ``min_snr_gamma``) weighting of the timesteps."""
        if loss_weight not in ("uniform", "min_snr"):
            raise ValueError(f"diffusion.loss_weight must be 'uniform' or 'min_snr', got "
                             f"{loss_weight!r}")
        if not min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.gamma = float(min_snr_gamma) if loss_weight == "min_snr" else None
        self.diffusion = diffusion
        self.patch_size = patch_size
        self.groups = tuple(group_channels) if group_channels and len(group_channels) > 1 else None
        self.decoder, self.mae_weight = decoder, float(mae_weight)
        if self.mae_weight and not decoder:
            raise ValueError("the MAE loss needs predictions at the masked positions: a model "
                             "with a decoder (model.decoder_depth > 0)")

    @classmethod
    def for_model(cls, diffusion: GaussianDiffusion, mcfg, mae_weight: float = 0.0,
                  loss_weight: str = "uniform", min_snr_gamma: float = 5.0):
        """The objective for a resolved ``ModelConfig``."""
        return cls(diffusion, mcfg.patch_size, mcfg.group_channels,
                   decoder=bool(mcfg.decoder_depth), mae_weight=mae_weight,
                   loss_weight=loss_weight, min_snr_gamma=min_snr_gamma)

    def _mse(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """The mean squared error over every element (only the ``valid`` ones, if given), each
        sample's errors weighted by its timestep's weight under min-SNR."""
        if self.gamma is None and valid is None:
            return F.mse_loss(pred.float(), target.float())
        err = (pred.float() - target.float()) ** 2
        if valid is not None:
            err = err * valid
        if self.gamma is not None:
            w = self.diffusion.min_snr_weight(t, self.gamma)
            err = err * w.view(-1, *([1] * (err.ndim - 1)))
        return err.sum() / valid.sum() if valid is not None else err.mean()

    def __call__(self, net, batch, keep_idx: torch.Tensor | None, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``batch`` (anything with ``.x0`` [B, C, H, W], ``.labels`` and, for a
        model with flip_condition, ``.flips``).

        ``t`` [B] and ``noise`` [B, C, H, W] come from ``maskdm.pipeline.randomness.draw_step`` in training.
        """
        x0 = batch.x0
        x_t = self.diffusion.q_sample(x0, t, noise.to(x0.dtype))
        flips = getattr(batch, "flips", None)
        args = (x_t, t, keep_idx, getattr(batch, "labels", None))
        pred = net(*args, flips) if flips is not None else net(*args)
        if keep_idx is None:
            target = noise
        elif self.decoder:
            dsm = self._mse(gather_tokens(pred, keep_idx),
                            gather_tokens(patchify(noise, self.patch_size), keep_idx), t)
            if not self.mae_weight:
                return dsm
            return dsm + self.mae_weight * mae_loss(pred, x_t, keep_idx, self.patch_size)
        elif self.groups is None:
            target = gather_tokens(patchify(noise, self.patch_size), keep_idx)
        else:
            target = gather_tokens(group_tokens(noise, self.patch_size, self.groups), keep_idx)
            valid = gather_tokens(token_valid(noise.shape[-1] // self.patch_size,
                                              self.patch_size, self.groups, noise.device)
                                  .expand(len(noise), -1, -1), keep_idx)
            return self._mse(pred, target, t, valid)
        return self._mse(pred, target, t)
