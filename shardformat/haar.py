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


def _doubled(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> int16 ``[12, H/2, W/2]``: twice the Haar coefficients, in integer
    arithmetic (exact; about 15x faster than ``pywt.dwt2`` in float and rounding back)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    h, w, _ = img.shape
    if h % 2 or w % 2:
        raise ValueError(f"image size must be even for a level-1 DWT, got {w}x{h}")
    x = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.int16)
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    s, t, u, v = a + b, a - b, c + d, c - d
    out = np.empty((NUM_CHANNELS, h // 2, w // 2), np.int16)
    np.add(s, u, out=out[0:3])  # 2 LL = a+b+c+d
    np.subtract(s, u, out=out[3:6])  # 2 H = a+b-c-d
    np.add(t, v, out=out[6:9])  # 2 V = a-b+c-d
    np.subtract(t, v, out=out[9:12])  # 2 D = a-b-c+d
    return out


# float16 of every half-integer a coefficient can take (-510 .. 510 in steps of 0.5), indexed by
# twice the coefficient + 1020: a table look-up is ~8x faster than numpy's float16 conversion.
_HALVES = (np.arange(-1020, 1021, dtype=np.float32) * 0.5).astype(np.float16)


def _to_float16(doubled: np.ndarray) -> np.ndarray:
    idx = doubled.astype(np.intp)
    idx += 1020
    return np.take(_HALVES, idx)


def dwt_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` image -> float16 ``[12, H/2, W/2]`` Haar coefficients (exact).

    The values are pywavelets' Haar (rounded to the exact 0.5 grid); a zero is always +0.0
    (shards written by maskdm before 0.2.1 may hold -0.0 where pywavelets' float arithmetic
    produced it: the same values)."""
    return _to_float16(_doubled(img))


def dwt_uint8_with_moments(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dwt_uint8`` and ``channel_moments`` of one image in one pass (what sharding needs)."""
    doubled = _doubled(img)
    return (_to_float16(doubled), *_moments_of_doubled(doubled))


def image_moments(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``channel_moments(dwt_uint8(img))`` without the float16 tensor."""
    return _moments_of_doubled(_doubled(img))


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


# Value bounds of a stored tensor, on the float16 bit patterns: for a non-negative float16 the
# unsigned order of its bits is the order of its values, and ``bits & 0x7FFF`` is its magnitude.
# LL = (a+b+c+d)/2 lies in [0, 510]: its raw bits are at most those of 510.0 (a set sign bit, i.e.
# a negative value, is larger). H, V, D lie in [-255, 255]: magnitude bits at most those of 255.0.
# NaN and Inf (all exponent bits set) exceed both. Cheap enough for every sample on every backend:
# a loader computes per channel ``max(bits)`` and ``max(bits & 0x7FFF)`` and calls
# ``bounds_problem``.
LL_MAX_BITS = 0x5FF8  # float16 510.0
DETAIL_MAX_MAG_BITS = 0x5BF8  # float16 255.0


def bounds_problem(max_bits, max_mag_bits) -> str | None:
    """Per-channel (12) maxima of the raw and of the magnitude bits of a stored ``dwt16`` tensor ->
    None if every coefficient is within a Haar DWT of uint8 pixels, else what is wrong, in words."""
    max_bits = np.asarray(max_bits).astype(np.int64)
    max_mag = np.asarray(max_mag_bits).astype(np.int64)
    worst = max_mag.max()
    if worst >= 0x7C00:
        return "dwt16 holds NaN/Inf"
    if (max_bits[:3] > LL_MAX_BITS).any():
        ll = np.array(max_mag[:3], np.uint16).view(np.float16).max()
        sign = "a negative value" if (max_bits[:3] >= 0x8000).any() else f"{float(ll):g}"
        return f"dwt16 LL band holds {sign}, outside [0, 510] (damaged values)"
    if (max_mag[3:] > DETAIL_MAX_MAG_BITS).any():
        mag = np.array(max_mag[3:], np.uint16).view(np.float16).max()
        return f"dwt16 detail band holds magnitude {float(mag):g}, outside [-255, 255] (damaged values)"
    return None


def out_of_bounds(max_bits: np.ndarray, max_mag_bits: np.ndarray) -> np.ndarray:
    """Vectorised ``bounds_problem is not None`` over rows of per-channel maxima ``[N, 12]``."""
    return ((np.asarray(max_bits)[:, :3] > LL_MAX_BITS).any(axis=1)
            | (np.asarray(max_mag_bits)[:, 3:] > DETAIL_MAX_MAG_BITS).any(axis=1))


def check_bounds(coeffs: np.ndarray) -> str | None:
    """``bounds_problem`` of one stored ``[12, h, w]`` float16 tensor (about 20 us at 256 px)."""
    bits = coeffs.view(np.uint16).reshape(coeffs.shape[0], -1)
    if bits[:3].max() <= LL_MAX_BITS and (bits[3:] & 0x7FFF).max() <= DETAIL_MAX_MAG_BITS:
        return None  # the common case, without per-channel bookkeeping
    return bounds_problem(bits.max(axis=1), (bits & 0x7FFF).max(axis=1))


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
    """Per-channel sum and sum of squares (float64) of the model-space tensor of one sample
    (``coeffs``: Haar coefficients of uint8 pixels, i.e. multiples of 0.5)."""
    return _moments_of_doubled(np.rint(coeffs.astype(np.float32) * 2.0).astype(np.int32))


def _moments_of_doubled(doubled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``channel_moments`` from twice the coefficients (integers): the sums are taken exactly in
    integers, then mapped to model space (``m = doubled / 510 + offset``) in float64."""
    d = doubled.reshape(doubled.shape[0], -1)
    n = d.shape[1]
    s1 = d.sum(axis=1, dtype=np.int64)
    s2 = np.square(d, dtype=np.int32).sum(axis=1, dtype=np.int64)  # each square < 2^31
    off = MODEL_OFFSET.astype(np.float64)
    return s1 / 510.0 + off * n, s2 / 510.0 ** 2 + 2.0 * off * s1 / 510.0 + off * off * n
