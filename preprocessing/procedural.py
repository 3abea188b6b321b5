"""A built-in, seeded generator of face-like images: the demo's and the tests' dataset.

Each image is a pure function of ``(seed, index, size)``: a background with soft light, shoulders,
a shaded head lit from a random direction, ears, hair (with strand texture), eyes with irises and
lids, eyebrows, nose shading and a mouth whose curvature varies. Edges are soft (about one pixel),
so the images have both global structure (layout, lighting) and local detail (edges, texture)
without aliasing at any size. Identity-like labels: ``label(seed, index, num_classes)``.
"""

from __future__ import annotations

import numpy as np

SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90],
                 [141, 85, 54], [92, 56, 38]], dtype=np.float32) / 255.0
HAIR = np.array([[20, 16, 14], [60, 40, 28], [110, 72, 40], [180, 140, 90], [225, 200, 140],
                 [140, 50, 30], [200, 200, 200]], dtype=np.float32) / 255.0
IRIS = np.array([[80, 50, 30], [40, 90, 150], [60, 110, 60], [100, 80, 50]], dtype=np.float32) / 255.0


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), 0x51D]))


def _soft(sd: np.ndarray, px: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside), antialiased over about one pixel."""
    return np.clip(0.5 - sd / px, 0.0, 1.0)


def _ellipse_sd(x, y, cx, cy, rx, ry):
    """Approximate signed distance to an axis-aligned ellipse (exact on the axes)."""
    k = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return (k - 1.0) * min(rx, ry)


def _over(canvas: np.ndarray, color, alpha: np.ndarray) -> None:
    a = alpha[..., None]
    canvas *= 1.0 - a
    canvas += a * np.asarray(color, dtype=np.float32)


def render(seed: int, index: int, size: int) -> np.ndarray:
    """Face-like image number ``index`` of the set ``seed`` -> uint8 ``[size, size, 3]``."""
    r = _rng(seed, index)
    px = 2.0 / size  # one pixel in normalised units
    lin = (np.arange(size, dtype=np.float32) + 0.5) * px - 1.0
    y, x = np.meshgrid(lin, lin, indexing="ij")

    # Background: two-colour gradient plus a soft light blob.
    c0, c1 = r.uniform(0.15, 0.95, 3), r.uniform(0.15, 0.95, 3)
    ang = r.uniform(0, 2 * np.pi)
    g = np.clip(0.5 + 0.5 * (np.cos(ang) * x + np.sin(ang) * y), 0, 1)[..., None]
    canvas = (c0 * (1 - g) + c1 * g).astype(np.float32)
    bx, by = r.uniform(-1, 1, 2)
    canvas += 0.15 * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / 0.3)[..., None]

    # Head geometry, with a small roll of the whole face.
    cx, cy = r.uniform(-0.08, 0.08), r.uniform(-0.12, 0.02)
    rx = r.uniform(0.36, 0.46)
    ry = rx * r.uniform(1.18, 1.35)
    roll = r.uniform(-0.18, 0.18)
    cr, sr = np.cos(roll), np.sin(roll)
    fx = cr * (x - cx) + sr * (y - cy)  # face frame: origin at the head centre
    fy = -sr * (x - cx) + cr * (y - cy)

    skin_t = r.uniform(0, len(SKIN) - 1)
    lo = int(skin_t)
    skin = SKIN[lo] * (1 - (skin_t - lo)) + SKIN[min(lo + 1, len(SKIN) - 1)] * (skin_t - lo)
    hair = HAIR[r.integers(len(HAIR))] * r.uniform(0.8, 1.15)
    cloth = r.uniform(0.05, 0.9, 3)

    # Shoulders and neck.
    _over(canvas, cloth, _soft(_ellipse_sd(x, y, cx, 1.25, 0.95, 0.55), px))
    _over(canvas, skin * 0.85, _soft(_ellipse_sd(fx, fy, 0.0, ry * 0.95, rx * 0.42, ry * 0.45), px))

    # Long hair behind the head.
    long_hair = r.random() < 0.45
    if long_hair:
        hl = _soft(_ellipse_sd(fx, fy, 0.0, ry * 0.25, rx * 1.25, ry * 1.15), px)
        _over(canvas, hair * 0.8, hl)

    # Ears.
    for side in (-1.0, 1.0):
        _over(canvas, skin * 0.9, _soft(_ellipse_sd(fx, fy, side * rx * 0.98, -ry * 0.05,
                                                    rx * 0.14, ry * 0.2), px))

    # Head, Lambert-shaded as an ellipsoid lit from a random direction.
    head = _soft(_ellipse_sd(fx, fy, 0.0, 0.0, rx, ry), px)
    nx, ny = fx / rx, fy / ry
    nz = np.sqrt(np.clip(1.0 - nx ** 2 - ny ** 2, 0.0, 1.0))
    light = r.normal(size=3) * np.array([1.0, 0.7, 0.3]) + np.array([0.0, -0.3, 1.2])
    light /= np.linalg.norm(light)
    shade = 0.55 + 0.55 * np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    skin_img = skin[None, None, :] * shade[..., None]
    canvas = canvas * (1 - head[..., None]) + skin_img * head[..., None]

    # Hair on top: inside a slightly larger ellipse and above a wavy hairline.
    hairline = -ry * r.uniform(0.25, 0.55) + 0.06 * np.cos(fx / rx * np.pi * r.uniform(0.8, 1.6)
                                                            + r.uniform(0, np.pi))
    part = r.uniform(-0.5, 0.5) * rx
    hairline = hairline + 0.08 * np.exp(-((fx - part) / (0.15 * rx)) ** 2)
    top = _soft(_ellipse_sd(fx, fy, 0.0, -ry * 0.06, rx * 1.07, ry * 1.03), px) * _soft(fy - hairline, px)
    strands = 0.85 + 0.15 * np.sin((np.arctan2(fy - 0.3 * ry, fx) * r.uniform(40, 90)) + 3 * fy / ry)
    hair_img = hair[None, None, :] * strands[..., None] * (0.8 + 0.3 * shade[..., None])
    canvas = canvas * (1 - top[..., None]) + np.clip(hair_img, 0, 1) * top[..., None]

    # Eyes, irises, pupils, lids; eyebrows.
    eye_y = -ry * r.uniform(0.02, 0.15)
    eye_dx = rx * r.uniform(0.32, 0.42)
    eye_w, eye_h = rx * r.uniform(0.16, 0.22), ry * r.uniform(0.045, 0.085)
    gaze = r.uniform(-0.35, 0.35, 2)
    iris_col = IRIS[r.integers(len(IRIS))]
    brow_lift = r.uniform(0.08, 0.16) * ry
    brow_tilt = r.uniform(-0.25, 0.25)
    for side in (-1.0, 1.0):
        ex = side * eye_dx
        white = _soft(_ellipse_sd(fx, fy, ex, eye_y, eye_w, eye_h), px)
        _over(canvas, (0.95, 0.94, 0.92), white)
        ix, iy = ex + gaze[0] * eye_w * 0.5, eye_y + gaze[1] * eye_h * 0.4
        ir = eye_h * 1.05
        _over(canvas, iris_col, white * _soft(_ellipse_sd(fx, fy, ix, iy, ir, ir), px))
        _over(canvas, (0.02, 0.02, 0.02), white * _soft(_ellipse_sd(fx, fy, ix, iy, ir * 0.45, ir * 0.45), px))
        lid = _soft(np.abs(_ellipse_sd(fx, fy, ex, eye_y, eye_w, eye_h)) - px * 0.6, px)
        _over(canvas, skin * 0.45, lid * 0.8)
        bx_ = fx - ex
        brow_y = eye_y - eye_h - brow_lift + side * brow_tilt * bx_ + 0.6 * (bx_ / eye_w) ** 2 * eye_h
        brow = _soft(np.abs(fy - brow_y) - eye_h * 0.28, px) * _soft(np.abs(bx_) - eye_w * 1.1, px)
        _over(canvas, hair * 0.7, brow)

    # Nose: a soft shadow on the lit-away side and two nostrils.
    nose_len = ry * r.uniform(0.22, 0.32)
    nose_side = -np.sign(light[0]) if abs(light[0]) > 0.05 else 1.0
    ridge = np.exp(-((fx - nose_side * rx * 0.06) / (rx * 0.05)) ** 2) * \
        (np.clip((fy - eye_y) / nose_len, 0, 1) * (fy < eye_y + nose_len))
    _over(canvas, skin * 0.55, ridge * 0.35 * head)
    for side in (-1.0, 1.0):
        nos = _soft(_ellipse_sd(fx, fy, side * rx * 0.07, eye_y + nose_len, rx * 0.04, ry * 0.02), px)
        _over(canvas, skin * 0.35, nos * 0.8)

    # Mouth: a lip band bent by the smile, open on some faces.
    mouth_y = eye_y + nose_len + ry * r.uniform(0.18, 0.28)
    mouth_w = rx * r.uniform(0.28, 0.45)
    smile = r.uniform(-0.4, 1.0) * ry * 0.12
    my = fy - (mouth_y - smile * (fx / mouth_w) ** 2)
    inside_w = _soft(np.abs(fx) - mouth_w, px)
    lip_col = skin * np.array([0.85, 0.55, 0.55]) * r.uniform(0.8, 1.05)
    open_h = max(0.0, r.uniform(-0.6, 1.0)) * ry * 0.05
    _over(canvas, lip_col, inside_w * _soft(np.abs(my) - (ry * 0.035 + open_h), px))
    if open_h > 0:
        _over(canvas, (0.25, 0.05, 0.06), inside_w * _soft(np.abs(my) - open_h, px) *
              _soft(np.abs(fx) - mouth_w * 0.85, px))

    # Glasses on some faces.
    if r.random() < 0.2:
        frame = r.uniform(0.0, 0.4, 3)
        for side in (-1.0, 1.0):
            ring = np.abs(_ellipse_sd(fx, fy, side * eye_dx, eye_y, eye_w * 1.45, eye_w * 1.15))
            _over(canvas, frame, _soft(ring - px * 0.9, px))
        bridge = _soft(np.abs(fy - eye_y + eye_h) - px * 0.8, px) * _soft(np.abs(fx) - (eye_dx - eye_w * 1.45), px)
        _over(canvas, frame, bridge)

    # Global exposure and colour temperature; a gentle vignette.
    canvas *= r.uniform(0.85, 1.15) * np.array([1.0 + r.uniform(-0.06, 0.06), 1.0,
                                                1.0 + r.uniform(-0.06, 0.06)], dtype=np.float32)
    canvas *= (1.0 - 0.18 * (x ** 2 + y ** 2))[..., None]
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def label(seed: int, index: int, num_classes: int) -> int:
    """A stable pseudo-identity label for image ``index`` (for conditional-model tests)."""
    return int(_rng(seed, index).integers(1 << 30) % num_classes)
