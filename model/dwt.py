"""Level-1 orthonormal Haar DWT in torch (any device), matching pywavelets and the shard layout.

Layout: ``[B, 12, H/2, W/2]``, subband-major ``LL, H, V, D``, each ``R, G, B``. For a 2x2 block
``a b / c d``: ``LL=(a+b+c+d)/2, H=(a+b-c-d)/2, V=(a-b+c-d)/2, D=(a-b-c+d)/2``.
Model space (the shard contract): ``LL/255 - 1`` and ``detail/255``, i.e. the Haar of the image
scaled to [-1, 1] with 1/4 normalisation; every band lies in [-1, 1].
"""

from __future__ import annotations

import torch

# Left-right mirror: LL and H keep their sign, V and D change it.
FLIP_SIGN = (1.0,) * 6 + (-1.0,) * 6


def dwt(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 12, H/2, W/2] orthonormal Haar coefficients (same dtype)."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    out = x.new_empty((*x.shape[:-3], 4 * x.shape[-3], x.shape[-2] // 2, x.shape[-1] // 2))
    ll, dh, dv, dd = out.chunk(4, dim=-3)
    # each band summed left to right, written in place (no concatenation, no extra copies)
    s, t = a + b, a - b
    torch.add(s, c, out=ll).add_(d)
    torch.sub(s, c, out=dh).sub_(d)
    torch.add(t, c, out=dv).sub_(d)
    torch.sub(t, c, out=dd).add_(d)
    return out.mul_(0.5)


def idwt(coeffs: torch.Tensor) -> torch.Tensor:
    """[B, 12, h, w] -> [B, 3, 2h, 2w]: the exact inverse of ``dwt``."""
    ll, dh, dv, dd = coeffs.chunk(4, dim=-3)
    out = coeffs.new_empty((*ll.shape[:-2], 2 * ll.shape[-2], 2 * ll.shape[-1]))
    # each pixel of a 2x2 block summed left to right, written straight into its place
    s, t = ll + dh, ll - dh
    torch.mul((s + dv).add_(dd), 0.5, out=out[..., 0::2, 0::2])
    torch.mul((s - dv).sub_(dd), 0.5, out=out[..., 0::2, 1::2])
    torch.mul((t + dv).sub_(dd), 0.5, out=out[..., 1::2, 0::2])
    torch.mul((t - dv).add_(dd), 0.5, out=out[..., 1::2, 1::2])
    return out


def flip(coeffs: torch.Tensor) -> torch.Tensor:
    """Horizontal flip done in the DWT domain: equals ``dwt(image.flip(-1))``."""
    sign = coeffs.new_tensor(FLIP_SIGN).view(12, 1, 1)
    return coeffs.flip(-1) * sign


def model_from_coeffs(coeffs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Haar coefficients of a 0..255 image -> model space (float32), into ``out`` if given."""
    c = coeffs.float() if out is None else out.copy_(coeffs)
    c.mul_(1.0 / 255.0)  # the same float32 arithmetic as shardformat.haar
    c[..., :3, :, :] -= 1.0
    return c


def model_from_image(img: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) [B, 3, H, W] -> DWT model space [B, 12, H/2, W/2] float32."""
    return model_from_coeffs(dwt(img.float()))


def image_from_model(m: torch.Tensor) -> torch.Tensor:
    """DWT model space [B, 12, h, w] -> uint8 [B, 3, 2h, 2w] (clamped, rounded)."""
    c = m.float() * 255.0
    c[:, :3] += 255.0
    return idwt(c).round().clamp(0, 255).to(torch.uint8)


def pixels_from_image(img: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> pixel model space in [-1, 1] (float32)."""
    return img.float() / 127.5 - 1.0


def image_from_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixel model space [-1, 1] -> uint8."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
