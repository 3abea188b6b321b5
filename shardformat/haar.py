"""Level-1 orthonormal Haar DWT of uint8 RGB images, stored losslessly as float16.

Layout (the shard contract): ``(12, H/2, W/2)``, subband-major ``LL, H, V, D``, each ``R, G, B``,
with pywavelets' naming for the detail bands. For pixels ``a b / c d`` of a 2x2 block:
``LL = (a+b+c+d)/2``, ``H = (a+b-c-d)/2``, ``V = (a-b+c-d)/2``, ``D = (a-b-c+d)/2``. On uint8 input
every coefficient is a multiple of 0.5 in [-255, 510], which float16 represents exactly.
"""

from __future__ import annotations

import numpy as np
import pywt

SUBBANDS = ("LL", "H", "V", "D")
NUM_CHANNELS = 12
# A left-right mirror swaps a<->b and c<->d: LL and H keep their sign, V and D flip it.
FLIP_SIGN = np.array([1.0] * 6 + [-1.0] * 6, dtype=np.float32)
# Model space: LL -> c/255 - 1 (in [-1, 1]), details -> c/255 (in [-1, 1]).
MODEL_SCALE = 1.0 / 255.0
MODEL_OFFSET = np.array([-1.0] * 3 + [0.0] * 9, dtype=np.float32)


def tensor_shape(image_size: int) -> tuple[int, int, int]:
    """Shape of the stored ``dwt16`` tensor of an ``image_size`` square image."""
    return (NUM_CHANNELS, image_size // 2, image_size // 2)


def dwt16_nbytes(image_size: int) -> int:
    """Bytes of one ``dwt16`` component (float16)."""
    c, h, w = tensor_shape(image_size)
    return c * h * w * 2


class NotLossless(ValueError):
    """Stored coefficients do not invert to uint8 pixels (damaged or not written by maskdm)."""


def dwt_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` image -> float16 ``[12, H/2, W/2]`` Haar coefficients (exact)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    h, w, _ = img.shape
    if h % 2 or w % 2:
        raise ValueError(f"image size must be even for a level-1 DWT, got {w}x{h}")
    chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
    ll, (dh, dv, dd) = pywt.dwt2(chw, "haar", axes=(-2, -1))
    coeffs = np.concatenate([ll, dh, dv, dd], axis=0)
    # pywavelets applies 1/sqrt(2) twice in floating point; snap back to the exact 0.5 grid.
    return (np.rint(coeffs * 2.0) * 0.5).astype(np.float16)


def idwt(coeffs: np.ndarray) -> np.ndarray:
    """``[12, h, w]`` Haar coefficients -> float64 ``[2h, 2w, 3]`` image (the exact inverse)."""
    if coeffs.ndim != 3 or coeffs.shape[0] != NUM_CHANNELS:
        raise ValueError(f"expected [12, h, w] coefficients, got {coeffs.shape}")
    c = coeffs.astype(np.float64)
    ll, dh, dv, dd = c[0:3], c[3:6], c[6:9], c[9:12]
    img = pywt.idwt2((ll, (dh, dv, dd)), "haar", axes=(-2, -1))
    return img.transpose(1, 2, 0)


def idwt_uint8(coeffs: np.ndarray) -> np.ndarray:
    """Invert stored coefficients to the original uint8 ``[H, W, 3]`` image, or raise NotLossless.

    Uses the closed form in float64, which is exact for coefficients on the 0.5 grid, so any
    coefficient off the grid (or with inconsistent parity) shows up as a non-integral pixel.
    """
    if coeffs.ndim != 3 or coeffs.shape[0] != NUM_CHANNELS:
        raise ValueError(f"expected [12, h, w] coefficients, got {coeffs.shape}")
    c = coeffs.astype(np.float64)
    if not np.isfinite(c).all():
        raise NotLossless("coefficients contain NaN or Inf")
    ll, dh, dv, dd = c[0:3], c[3:6], c[6:9], c[9:12]
    _, h, w = ll.shape
    img = np.empty((3, 2 * h, 2 * w))
    img[:, 0::2, 0::2] = (ll + dh + dv + dd) * 0.5
    img[:, 0::2, 1::2] = (ll + dh - dv - dd) * 0.5
    img[:, 1::2, 0::2] = (ll - dh + dv - dd) * 0.5
    img[:, 1::2, 1::2] = (ll - dh - dv + dd) * 0.5
    rounded = np.rint(img)
    bad = img != rounded
    if bad.any():
        raise NotLossless(f"inverse DWT is not integral at {int(bad.sum())} pixel value(s)")
    if rounded.min() < 0 or rounded.max() > 255:
        raise NotLossless(f"inverse DWT leaves [0, 255] (range {rounded.min():g}..{rounded.max():g})")
    return rounded.astype(np.uint8).transpose(1, 2, 0)


def decode_dwt16(raw: bytes, image_size: int) -> np.ndarray:
    """Raw little-endian float16 bytes -> ``[12, S/2, S/2]`` float16 array (a view, no copy)."""
    half = image_size // 2
    expected = NUM_CHANNELS * half * half * 2
    if len(raw) != expected:
        raise ValueError(f"dwt16 component has {len(raw)} bytes, expected {expected} "
                         f"(12 x {half} x {half} float16)")
    return np.frombuffer(raw, dtype="<f2").reshape(NUM_CHANNELS, half, half)


def to_model_space(coeffs: np.ndarray) -> np.ndarray:
    """Haar coefficients ``[12, h, w]`` -> float32 model-space tensor (each band in [-1, 1])."""
    return coeffs.astype(np.float32) * MODEL_SCALE + MODEL_OFFSET[:, None, None]


def channel_moments(coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sum and sum of squares (float64) of the model-space tensor of one sample."""
    m = to_model_space(coeffs).reshape(coeffs.shape[0], -1)
    return m.sum(axis=1, dtype=np.float64), np.einsum("ij,ij->i", m, m, dtype=np.float64)
