"""Decode, validate, crop and resize one source image, deterministically.

Every failure becomes a ``Skip`` with a reason a person can act on; nothing here raises anything
else for bad input. Policy (documented in the README):
- modes: grayscale, palette, CMYK, YCbCr, 16-bit (scaled 65535 -> 255) become RGB; images with
  transparency are composited over white; floating-point images are skipped;
- EXIF orientation is applied before cropping;
- crop: a square of the short side at the center, or a square around ``bbox`` (x, y, w, h);
- resize: Lanczos with antialiasing; large JPEGs are first DCT-downscaled by libjpeg to no less than
  twice the target size (fast, and no visible loss after the Lanczos pass);
- crops smaller than the target are upscaled (``small="upscale"``) if their side is at least
  ``min_side`` pixels, otherwise skipped; ``small="skip"`` skips them all.
"""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000
# Memory a decode may take, per --max-pixels pixel (about 0.5 GB at the default): images whose
# pixel format needs more memory per pixel (16/32-bit, alpha) are allowed proportionally fewer
# pixels.
DECODE_BYTES_PER_PIXEL = 8
# Peak bytes per pixel that prepare() takes, by decoded mode (measured with Pillow 13 on
# 8000x8000 / 5600x5600 PNGs: RGB 3.9, L 4.9, I;16 6.9, RGBA 19.1): the decoded image, its
# conversion to RGB, the resize's source.
_PEAK_BYTES = {"1": 5, "L": 5, "P": 6, "RGB": 4, "RGBX": 4, "YCbCr": 8, "CMYK": 8, "LAB": 8,
               "HSV": 8, "LA": 20, "PA": 20, "La": 20, "RGBA": 20, "RGBa": 20, "I;16": 7,
               "I;16L": 7, "I;16B": 7, "I;16N": 7, "I": 9, "F": 8}
DEFAULT_MAX_FILE_MB = 256  # a source file larger than this is skipped before it is read


class Skip(Exception):
    """This input cannot be converted; ``str(self)`` is the reason recorded in skipped.jsonl."""


@dataclass
class Prepared:
    image: np.ndarray  # uint8 [size, size, 3]
    orig_size: tuple[int, int]  # (width, height) as displayed (after EXIF orientation)
    crop: tuple[float, float, float, float]  # (left, top, right, bottom) in original pixels
    upscaled: bool
    mode: str  # the source's PIL mode, for the record


def too_large(nbytes: int, max_bytes: int | None) -> None:
    """Skip a source file (or zip member) over ``max_bytes`` before it is read."""
    if max_bytes is not None and nbytes > max_bytes:
        raise Skip(f"file of {nbytes / 2 ** 20:.0f} MiB is larger than --max-file-mb "
                   f"{max_bytes / 2 ** 20:.0f}; raise it if the image is genuine")


def read_file(path: str, max_bytes: int | None = DEFAULT_MAX_FILE_MB * 2 ** 20) -> bytes:
    """Read a source file's bytes, turning every filesystem problem into a ``Skip``; a file over
    ``max_bytes`` is skipped before it is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Skip(f"broken symlink (target {os.readlink(path)!r} does not exist)") from None
        raise Skip("file vanished while sharding") from None
    except OSError as e:
        raise Skip(f"cannot stat file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Skip("not a regular file (device, FIFO or socket)")
    if st.st_size == 0:
        raise Skip("empty file (0 bytes)")
    too_large(st.st_size, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
        too_large(len(data), max_bytes)  # it grew after the stat
        return data
    except PermissionError:
        raise Skip("unreadable: permission denied") from None
    except OSError as e:
        raise Skip(f"unreadable: {e.strerror or e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        out = np.empty(arr.shape[:2], np.uint8)
        for r in range(0, arr.shape[0], 256):  # in bands: no int64 copy of the whole image
            band = np.clip(arr[r:r + 256].astype(np.int64), 0, 65535)
            out[r:r + 256] = (band * 255 + 32767) // 65535
        del arr
        return Image.fromarray(out, "L").convert("RGB")
    if mode == "F":
        raise Skip("unsupported pixel format: 32-bit floating point (mode F); convert to 8-bit first")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def square_crop(width: int, height: int, bbox: tuple[float, float, float, float] | None):
    """(left, top, right, bottom) of the square to crop: centered, or around ``bbox=(x, y, w, h)``."""
    short = min(width, height)
    if bbox is None:
        left, top = (width - short) / 2.0, (height - short) / 2.0
        return (left, top, left + short, top + short)
    x, y, w, h = bbox
    side = min(max(w, h), short)
    cx, cy = x + w / 2.0, y + h / 2.0
    left = min(max(cx - side / 2.0, 0.0), width - side)
    top = min(max(cy - side / 2.0, 0.0), height - side)
    return (left, top, left + side, top + side)


def prepare(data: bytes | np.ndarray, size: int, *, bbox=None, small: str = "upscale",
            min_side: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Source bytes (or a uint8 [H, W, 3] array) -> ``Prepared`` image of ``size`` x ``size``."""
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data, "RGB")
    else:
        img = _open(data, max_pixels)
    src_mode = img.mode
    w0, h0 = img.size
    if img.format != "JPEG":
        # Reading EXIF from a PNG/WebP/TIFF decodes the whole image; do it here, where a decode
        # error skips the file, rather than inside the EXIF lookup, where it would be swallowed
        # and leave a partly decoded image to be sharded.
        try:
            img.load()
        except Exception as e:
            raise Skip(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    # EXIF orientation swaps width and height for 90-degree rotations.
    orientation = _exif_orientation(img)
    disp_w, disp_h = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
    crop = square_crop(disp_w, disp_h, bbox)
    side = crop[2] - crop[0]
    if side < size:
        if small == "skip" or side < min_side:
            why = "--small skip" if small == "skip" else f"below --min-side {min_side}"
            raise Skip(f"too small: {disp_w}x{disp_h} gives a {side:g}px crop, less than "
                       f"--size {size} ({why})")
    if img.format == "JPEG" and side >= 4 * size:
        scale = 2.0 * size / side
        img.draft("RGB", (math.ceil(w0 * scale), math.ceil(h0 * scale)))
    try:
        img.load()
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        sx, sy = rgb.size[0] / disp_w, rgb.size[1] / disp_h
        box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
        out = rgb.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    except Skip:
        raise
    except Exception as e:  # any decoder failure is a property of the file, not of our code
        raise Skip(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise Skip(f"decoder returned shape {arr.shape}, expected ({size}, {size}, 3)")
    return Prepared(image=arr, orig_size=(disp_w, disp_h), crop=tuple(float(c) for c in crop),
                    upscaled=side < size, mode=src_mode)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise Skip("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the --max-pixels check below replaces Pillow's fixed limit
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:16]
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "unknown data"
        # (never its bytes: skipped.jsonl is shared, and a link may reach any file)
        raise Skip(f"not an image: unrecognised format ({kind}, {len(data)} bytes)") from None
    except Exception as e:
        raise Skip(f"corrupt image header ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    w, h = img.size
    if w <= 0 or h <= 0:
        raise Skip(f"invalid image dimensions {w}x{h}")
    if w * h > max_pixels:
        raise Skip(f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds --max-pixels "
                   f"{max_pixels:,}; raise --max-pixels if the image is genuine")
    # the pixel format too, before decoding: 16-bit or alpha pixels take more memory
    peak = w * h * _PEAK_BYTES.get(img.mode, 20)
    if peak > max_pixels * DECODE_BYTES_PER_PIXEL:
        raise Skip(f"decompression bomb: {w}x{h} pixels of mode {img.mode} would take about "
                   f"{peak / 2 ** 20:,.0f} MiB to decode, more than --max-pixels "
                   f"{max_pixels:,} allows ({max_pixels * DECODE_BYTES_PER_PIXEL / 2 ** 20:,.0f} "
                   f"MiB); raise --max-pixels if the image is genuine")
    return img


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # malformed EXIF: keep the stored orientation
        return None


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes, 4:4:4 chroma so that colour detail survives."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0,
                                       optimize=False)
    return buf.getvalue()


def decode_jpeg(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] (raises on damage; callers decide how to report it). With
    ``size``, an image of another size (per its header) raises ValueError before decoding."""
    img = Image.open(io.BytesIO(data))
    if size is not None and img.size != (size, size):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    img.load()
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
