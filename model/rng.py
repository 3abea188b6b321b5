"""Training randomness per step: timesteps, noise and masks as a function of (seed, step).

Every rank draws the *global* batch's randomness from one generator seeded by ``(seed, step)``, in
fixed chunks of ``chunk`` samples, and keeps its own slice. A sample therefore gets the same
timestep, noise and mask whichever rank processes it and however the global batch is split
(2 ranks x b follow the same trajectory as 1 rank x 2b), and a resumed run needs no generator
state. Drawing the whole global batch costs one ``randn`` per chunk: about 0.1 ms per 256 samples
of 12x128x128 on an H100, far below a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import MaskSpec, sample_keep_idx

_M64 = (1 << 64) - 1
DEFAULT_CHUNK = 64


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser over the parts)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _M64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@dataclass
class StepRandomness:
    t: torch.Tensor  # [b] long timesteps
    noise: torch.Tensor  # [b, C, H, W]
    keep_idx: torch.Tensor | None  # [b, S] or None (no mask)


def draw_step(seed: int, step: int, global_batch: int, lo: int, hi: int,
              sample_shape: tuple[int, ...], num_timesteps: int, spec: MaskSpec,
              grid: tuple[int, int], device, chunk: int = DEFAULT_CHUNK) -> StepRandomness:
    """Randomness for samples ``lo:hi`` of a global batch of ``global_batch`` at ``step``."""
    if not 0 <= lo < hi <= global_batch:
        raise ValueError(f"slice {lo}:{hi} outside the global batch of {global_batch}")
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(seed, step))
    ts, noises, keeps = [], [], []
    for c0 in range(0, global_batch, chunk):
        c1 = min(c0 + chunk, global_batch)
        if c0 >= hi:
            break  # later chunks cannot affect ours: the draws are sequential
        n = c1 - c0
        t = torch.randint(0, num_timesteps, (n,), generator=g, device=device)
        noise = torch.randn((n, *sample_shape), generator=g, device=device)
        keep = sample_keep_idx(spec, n, grid, g)
        a, b = max(lo, c0) - c0, min(hi, c1) - c0
        if a < b:
            ts.append(t[a:b])
            noises.append(noise[a:b])
            if keep is not None:
                keeps.append(keep[a:b])
    return StepRandomness(torch.cat(ts), torch.cat(noises), torch.cat(keeps) if keeps else None)
