"""Sliced Wasserstein distance (SWD): a quality metric that needs no downloaded weights.

Two flavours, both between a set of generated images and a set of reference images:

- **Laplacian-pyramid patch SWD** (Karras et al., "Progressive Growing of GANs", ICLR 2018, Sec. 5):
  each image is split into a Laplacian pyramid (5-tap binomial filter, factor 2, down to 16x16);
  from every level, ``patches`` random 7x7 neighbourhoods per image become 147-dim descriptors,
  normalised per colour channel with the mean and std of the *reference* set's descriptors at that
  level (Karras et al. use each set's own statistics, which makes the score blind to a uniform
  colour shift or gain: measured on procedural faces, +40 on red or blue x 0.6 left it at the
  real-vs-real floor; with the reference's statistics both raise it well above); the distance
  between the two descriptor sets is the SWD. Per level and averaged; reported x 1e3 like the
  paper. The finest level measures noise, blur and texture; the low-pass residual (the coarsest
  level) layout and colour.
- **Whole-image SWD**: the same distance between the images themselves (pixels in [0, 1],
  flattened), x 1e3. Sensitive to global layout and colour; nearly blind to noise and blur (their
  energy is spread over many directions of the pixel space).

The SWD of two point sets of equal size is the mean, over random unit directions, of the
1-Wasserstein distance between their 1-D projections (the mean absolute difference of the sorted
projections). It is 0 for identical sets and, for two Gaussians differing by a shift ``delta``,
equals ``|delta| * E|theta_1|`` (theta uniform on the unit sphere). Values depend on the resolution,
the number of images and the data: use SWD for relative comparisons (runs scored against the same
reference with the same N), never next to published numbers (only FID is comparable with those).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_LEVEL = 16  # the coarsest pyramid level (Karras et al.)
NHOOD = 7


def sliced_wasserstein(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *,
                       directions: int = 128, repeats: int = 4, seed: int = 0) -> float:
    """SWD between point sets ``a`` [N, d] and ``b`` [M, d] (the larger is cut to the smaller's
    size, keeping its first rows): ``repeats`` x ``directions`` random unit directions."""
    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two [N, d] sets with the same d, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    n = min(len(a), len(b))
    if n < 2:
        raise ValueError("SWD needs at least 2 points in each set")
    a, b = a[:n], b[:n]
    gen = torch.Generator().manual_seed(int(seed))
    total = 0.0
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=gen)
        dirs /= dirs.norm(dim=0, keepdim=True)
        # one projection per row, sorted along contiguous rows (numpy's sort is the fastest here)
        pa = np.sort((dirs.T @ a.T).numpy(), axis=1)
        pb = np.sort((dirs.T @ b.T).numpy(), axis=1)
        total += float(np.abs(pa - pb).mean())
    return total / repeats


_KERNEL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    k = (_KERNEL[:, None] * _KERNEL[None, :] * gain).to(x)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


def laplacian_pyramid(images: torch.Tensor, min_size: int = MIN_LEVEL) -> list[torch.Tensor]:
    """float [N, C, H, W] -> Laplacian levels, finest first; the last is the low-pass residual
    at ``min_size`` (or the input itself if it is not larger)."""
    levels, cur = [], images
    while cur.shape[-1] > min_size and cur.shape[-1] % 2 == 0:
        down = _blur(cur)[..., ::2, ::2]
        up = torch.zeros_like(cur)
        up[..., ::2, ::2] = down
        levels.append(cur - _blur(up, gain=4.0))
        cur = down
    levels.append(cur)
    return levels


def _descriptors(level: torch.Tensor, patches: int, rng: np.random.Generator) -> torch.Tensor:
    """Random 7x7 neighbourhoods of every image of a level -> [N * patches, 49, C] (raw values;
    ``normalise`` scales them)."""
    n, c, h, w = level.shape
    r = NHOOD // 2
    ys = torch.from_numpy(rng.integers(r, h - r, size=(n, patches)))
    xs = torch.from_numpy(rng.integers(r, w - r, size=(n, patches)))
    off = torch.arange(-r, r + 1)
    yy = (ys[..., None, None] + off[:, None])  # [n, p, 7, 1]
    xx = (xs[..., None, None] + off[None, :])  # [n, p, 1, 7]
    idx = torch.arange(n)[:, None, None, None]
    desc = level.permute(0, 2, 3, 1)[idx, yy, xx]  # [n, p, 7, 7, C]
    return desc.reshape(n * patches, NHOOD * NHOOD, c)


def normalise(desc: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[M, 49, C] descriptors -> [M, 49*C], each channel shifted and scaled by the mean and std
    of the *reference* set's descriptors (of that level). Karras et al. normalise each set by its
    own statistics, which cancels a uniform colour shift or gain; with the reference's, both
    show (a deliberate deviation)."""
    mean, std = reference.mean(dim=(0, 1)), reference.std(dim=(0, 1)).clamp_min(1e-8)
    return ((desc - mean) / std).reshape(len(desc), -1)


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def swd_scores(samples: np.ndarray, reference: np.ndarray, *, patches: int = 64, seed: int = 0,
               directions: int = 128, repeats: int = 4) -> dict[str, float]:
    """All SWD numbers (x 1e3) between uint8 [N, H, W, 3] sets of the same image size:
    ``swd_<res>`` per pyramid level, ``swd_patch`` their mean, ``swd_image`` on whole images. The
    larger set is cut to the smaller's size."""
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"image sizes differ: samples {samples.shape[1:3]}, reference "
                         f"{reference.shape[1:3]}")
    n = min(len(samples), len(reference))
    a, b = _to_float(samples[:n]), _to_float(reference[:n])
    out: dict[str, float] = {}
    la, lb = laplacian_pyramid(a), laplacian_pyramid(b)
    per_level = []
    for i, (xa, xb) in enumerate(zip(la, lb)):
        # the same patch positions in both sets (positions do not depend on content), so a set
        # scored against itself gives exactly 0
        da = _descriptors(xa, patches, np.random.default_rng([seed, i]))
        db = _descriptors(xb, patches, np.random.default_rng([seed, i]))
        d = sliced_wasserstein(normalise(da, db), normalise(db, db),
                               directions=directions, repeats=repeats, seed=seed + i) * 1e3
        out[f"swd_{xa.shape[-1]}"] = d
        per_level.append(d)
    out["swd_patch"] = float(np.mean(per_level))
    out["swd_image"] = sliced_wasserstein(a.flatten(1), b.flatten(1), directions=directions,
                                          repeats=repeats, seed=seed) * 1e3
    out["n"] = n
    return out
