"""Gaussian diffusion: beta schedules, forward noising, DDPM and DDIM sampling (eps prediction).

A plain class, not an nn.Module: it owns no parameters. Sampling takes the network as an argument
(the EMA copy, usually) and draws noise either from one generator or from one seeded generator per
sample, in which case an image depends only on its seed (not on batch size or world size).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import numpy as np
import torch

Schedule = Literal["cosine", "linear"]
Sampler = Literal["ddim", "ddpm"]
# How the training loss weighs the timesteps: "uniform" (the plain eps-MSE of DDPM and of the
# paper) or "min_snr" (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
# Strategy"): each sample's eps-MSE times min(SNR_t, gamma) / SNR_t.
LossWeight = Literal["uniform", "min_snr"]
SCHEDULES = get_args(Schedule)
SAMPLERS = get_args(Sampler)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def linear_betas(T: int) -> np.ndarray:
    """Ho et al.'s linear schedule, rescaled so that any T spans the same noise range."""
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


class GaussianDiffusion:
    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000):
        if schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {schedule!r}")
        if num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps must be >= 2, got {num_timesteps}")
        self.schedule = schedule
        self.num_timesteps = T = num_timesteps
        betas = cosine_betas(T) if schedule == "cosine" else linear_betas(T)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _table(self, device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._cache:
            ac = self.alphas_cumprod
            self._cache[device] = {
                "sqrt_ac": torch.tensor(np.sqrt(ac), dtype=torch.float32, device=device),
                "sqrt_1m_ac": torch.tensor(np.sqrt(1 - ac), dtype=torch.float32, device=device),
                "snr": torch.tensor(ac / (1 - ac), dtype=torch.float32, device=device),
            }
        return self._cache[device]

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """[B] weights min(SNR_t, gamma) / SNR_t of the eps-MSE (Min-SNR-gamma): 1 where the
        noise is strong (SNR <= gamma), below 1 where it is weak, so that the nearly noise-free
        steps no longer dominate the gradient."""
        snr = self._table(t.device)["snr"][t]
        return snr.clamp(max=gamma) / snr

    @staticmethod
    def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0/noise [B, ...], t [B] int."""
        tab = self._table(x0.device)
        a = self._bcast(tab["sqrt_ac"][t], x0.ndim)
        b = self._bcast(tab["sqrt_1m_ac"][t], x0.ndim)
        return a * x0 + b * noise

    def timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps, evenly spaced from 0 ("leading" spacing), largest first.

        With fewer steps than T the chain starts at ``T - T/steps`` rather than ``T - 1``. Under
        the cosine schedule alpha-bar is 2.4e-9 at ``t = T - 1`` (its last beta is clipped to
        0.999) and 2.4e-6 at ``T - 2``; the x0 estimate divides by sqrt(alpha-bar), so there any
        error in the predicted eps is multiplied by ~2e4. With x0 clipping (``clip=True``, the
        default) that is contained; without it, deterministic DDIM started at ``T - 1`` blows up.
        (The paper's authors' sampler starts at ``T - 1``, with clipping.)
        """
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"sampling steps must be in 1..{self.num_timesteps}, got {steps}")
        ts = np.floor(np.arange(steps) * (self.num_timesteps / steps)).astype(np.int64)
        return ts[::-1].tolist()

    @torch.no_grad()
    def sample(self, net: Callable, shape: tuple[int, ...], *, sampler: str = "ddim",
               steps: int = 50, eta: float = 0.0, seeds: list[int] | None = None,
               generator: torch.Generator | None = None, device=None, labels=None,
               clip: bool = True, autocast_dtype: torch.dtype | None = None,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Draw ``shape[0]`` samples -> x0 [B, C, H, W] in model space (float32).

        ``sampler='ddpm'`` is ancestral sampling on the (respaced) schedule with the posterior
        variance; ``'ddim'`` uses ``eta`` (0 = deterministic). With ``seeds`` (one per sample)
        every image is a function of its own seed alone.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        device = torch.device(device or "cpu")
        B = shape[0]
        if seeds is not None:
            if len(seeds) != B:
                raise ValueError(f"got {len(seeds)} seeds for {B} samples")
            gens = seeded_generators(seeds, device)

            def noise() -> torch.Tensor:
                return seeded_noise(gens, shape[1:], device)
        else:
            def noise() -> torch.Tensor:
                return torch.randn(shape, generator=generator, device=device)

        ts = self.timesteps(steps)
        ac = self.alphas_cumprod
        x = noise()
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            ab = float(ac[t])
            ab_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
            tt = torch.full((B,), t, device=device, dtype=torch.long)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                eps = net(x, tt, None, labels)
            eps = eps.float()
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            if t_prev < 0:
                x = x0
            elif sampler == "ddim":
                sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
                x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
                if sigma > 0:
                    x = x + sigma * noise()
            else:  # ancestral step with the posterior q(x_prev | x_t, x0) of the respaced chain
                beta = 1 - ab / ab_prev
                mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + \
                    (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
                var = beta * (1 - ab_prev) / (1 - ab)
                x = mean + math.sqrt(var) * noise()
            if progress is not None:
                progress(i + 1, len(ts))
        return x


def seeded_generators(seeds: list[int], device) -> list[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def seeded_noise(gens: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """One standard normal tensor of ``shape`` per generator, stacked: each image's noise comes
    from its own seed's stream, so it depends on neither batch size nor world size. It costs a
    kernel launch per image (``benchmarks/sampling.py`` measures its share of a sampling step:
    0-1.6% on CPU at batches of 8-16; torch has no batched draw from many generators)."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
