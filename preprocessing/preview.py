"""``maskdm inspect``: a manifest summary and a preview grid reconstructed from stored tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from maskdm.shardformat import haar
from maskdm.shardformat.manifest import ShardManifest, load_manifest
from maskdm.shardformat.reader import ShardReader

from .images import decode_jpeg


def summary(m: ShardManifest, directory: str | Path) -> str:
    src = m.source
    total_bytes = sum(s.bytes for s in m.shards)
    from maskdm.shardformat.remote import is_remote
    where = directory if is_remote(directory) else Path(directory).resolve()
    lines = [
        f"dataset      {where}",
        f"format       {m.format} v{m.format_version}, written {m.created_at} by {m.tool}",
        f"source       {src['kind']}: {src['path']}",
        f"counts       found {src['found']}, selected {src['selected']}, written {src['written']}, "
        f"skipped {src['skipped']}, upscaled {src['upscaled']}",
        f"subset       {m.subset or 'none'}; shuffle seed {m.shuffle_seed}",
        f"images       {m.image_size}x{m.image_size}, encoding {m.encoding}, components "
        f"{', '.join(m.components)}",
        f"tensor       {tuple(m.tensor_shape)} float16, Haar level {m.dwt_level}, subbands "
        f"{'/'.join(m.subbands)}",
        f"shards       {len(m.shards)} ({total_bytes / 2**20:.1f} MiB, "
        f"{total_bytes / max(m.num_samples, 1) / 1024:.1f} KiB/sample)",
        f"labels       {m.num_classes} identities" if m.labels else "labels       none",
        "channel      " + "  ".join(f"{b:>11s}" for b in ("R", "G", "B")),
    ]
    for i, band in enumerate(m.subbands):
        mean = m.channel_mean[3 * i:3 * i + 3]
        std = m.channel_std[3 * i:3 * i + 3]
        lines.append(f"  {band:<2} mean/std " + "  ".join(f"{a:+.3f}/{b:.3f}" for a, b in zip(mean, std)))
    return "\n".join(lines)


def sample_image(data: dict[str, bytes], image_size: int) -> np.ndarray:
    """The stored image of a sample (ext -> component bytes) as uint8 [H, W, 3]: the exact
    inverse DWT of ``dwt16`` when present, else the decoded ``jpg``."""
    if "dwt16" in data:
        return haar.idwt_uint8(haar.decode_dwt16(data["dwt16"], image_size))
    return decode_jpeg(data["jpg"])


def read_samples(directory: str | Path, m: ShardManifest, n: int, seed: int | None = None):
    """Yield (key, uint8 [H, W, 3]) for ``n`` samples: the first ones, or a seeded random pick."""
    reader = ShardReader(directory, m)
    where = [(s, j) for s in range(len(reader.used)) for j in range(reader.order_sizes[s])]
    if seed is not None:
        pick = np.random.default_rng(seed).choice(len(where), size=min(n, len(where)), replace=False)
        where = [where[i] for i in sorted(pick)]
    for s, j in where[:n]:
        key, data = reader.read_at(s, j)
        yield key, sample_image(data, m.image_size)


def grid(images: list[np.ndarray], min_tile: int = 96) -> np.ndarray:
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size = images[0].shape[0]
    scale = max(1, math.ceil(min_tile / size))
    tile = size * scale
    canvas = np.full((rows * tile + (rows + 1) * 2, cols * tile + (cols + 1) * 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        if scale > 1:
            img = img.repeat(scale, 0).repeat(scale, 1)
        r, c = divmod(i, cols)
        y, x = 2 + r * (tile + 2), 2 + c * (tile + 2)
        canvas[y:y + tile, x:x + tile] = img
    return canvas


def write_preview(directory: str | Path, out_png: str | Path, n: int = 16,
                  seed: int | None = None) -> Path:
    m = load_manifest(directory)
    images = [img for _, img in read_samples(directory, m, n, seed)]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(images)).save(out_png)
    return out_png
