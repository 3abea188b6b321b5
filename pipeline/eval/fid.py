"""FID: Inception pool features -> (mean, covariance) statistics -> Fréchet distance.

Statistics are accumulated as float64 sums (count, sum, sum of outer products), so they can be
built in pieces on several ranks and summed with one all-reduce. Reference statistics for a shard
directory are computed once (from the inverse DWT, which gives back the stored uint8 images
exactly, or from the stored JPEGs) and saved beside its manifest as
``fid_stats-<feature id>.npz``; the feature id names the network, so statistics from the standard
FID weights are never compared with those of any other network.
"""

from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from maskdm.console import show_progress
from maskdm.pipeline import dist
from maskdm.shardformat.fsutil import atomic_write_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FIDError(RuntimeError):
    """A problem with FID inputs; the message names the file and the fix."""


# ----------------------------------------------------------------------------- statistics

class Accumulator:
    """Running float64 count / sum / sum of outer products of feature vectors."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        if not np.isfinite(f).all():
            raise FIDError("the feature network produced NaN/Inf features (broken weights?)")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum the accumulators of all ranks (a CPU collective; every rank must call it)."""
        for arr in (self.sum, self.outer):
            dist.all_reduce_cpu(torch.from_numpy(arr))  # in place: shares the numpy memory
        self.n = int(dist.all_sum(self.n))

    def stats(self, feature_id: str, source: str, skipped: int = 0) -> "FIDStats":
        if self.n < 2:
            raise FIDError(f"FID needs at least 2 images, got {self.n} from {source}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return FIDStats(mu, (sigma + sigma.T) / 2, self.n, feature_id, source, skipped)


@dataclass
class FIDStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_id: str
    source: str
    skipped: int = 0

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                 feature_id=np.array(self.feature_id), source=np.array(self.source),
                 skipped=np.int64(self.skipped), format=np.array("maskdm-fid-stats-v1"))
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FIDStats":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "feature_id" not in z:  # a pytorch-fid style .npz (mu, sigma only)
                    return cls(z["mu"], z["sigma"], 0, "unknown", str(path))
                return cls(z["mu"], z["sigma"], int(z["n"]), str(z["feature_id"]),
                           str(z["source"]), int(z["skipped"]))
        except (OSError, ValueError, KeyError) as e:
            raise FIDError(f"{path} is not a readable FID statistics file ({e}); recompute it "
                           f"with `maskdm fid-stats`") from None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which avoids the complex
    round-off of a general matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise FIDError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- features

def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FIDError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


@torch.no_grad()
def features(net, images: list[np.ndarray], device) -> np.ndarray:
    """uint8 [H, W, 3] images (any sizes) -> float64 features [N, D]."""
    out = []
    i = 0
    while i < len(images):  # batch runs of equal shape
        j = i + 1
        while j < len(images) and images[j].shape == images[i].shape:
            j += 1
        x = torch.from_numpy(np.stack(images[i:j])).to(device)
        out.append(net(x).double().cpu().numpy())
        i = j
    return np.concatenate(out) if out else np.zeros((0, 0))


def accumulate(net, batches: Iterable[list[np.ndarray]], dim: int, device,
               bar=None) -> Accumulator:
    acc = Accumulator(dim)
    for imgs in batches:
        if imgs:
            acc.add(features(net, imgs, device))
            if bar is not None:
                bar.update(len(imgs))
    return acc


def _bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr,
                disable=not (enabled and show_progress()), mininterval=1.0)


# ----------------------------------------------------------------------------- image folders

def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())
    if not files:
        raise FIDError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return files


def load_image(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # the sample set must be complete: a bad file stops FID
        raise FIDError(f"{path}: cannot read image ({e}); delete it and re-run `maskdm sample` "
                       f"(it fills the gap) before computing FID") from None


def folder_batches(files: list[Path], batch: int, workers: int = 4) -> Iterator[list[np.ndarray]]:
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for i in range(0, len(files), batch):
            yield list(pool.map(load_image, files[i:i + batch]))


def folder_stats(net, feature_id: str, folder, *, batch: int, device, limit: int | None = None,
                 progress: bool = True) -> FIDStats:
    files = list_images(folder)
    if limit is not None:
        if len(files) < limit:
            raise FIDError(f"{folder} holds {len(files)} images but --n {limit} was asked for; "
                           f"sample more with `maskdm sample --n {limit}`")
        files = files[:limit]
    bar = _bar(len(files), f"features {Path(folder).name}", progress)
    try:
        acc = accumulate(net, folder_batches(files, batch), net_dim(net), device, bar)
    finally:
        bar.close()
    return acc.stats(feature_id, str(Path(folder).resolve()))


def net_dim(net) -> int:
    return int(getattr(net, "feature_dim", 2048))


# ----------------------------------------------------------------------------- shard folders

def stats_path(shards: str | os.PathLike, feature_id: str) -> Path:
    """Where a shard folder's reference statistics are kept: beside its manifest, or for a folder
    in object storage in its cache folder on this machine."""
    from maskdm.shardformat.remote import RemoteShards, is_remote
    if is_remote(shards):
        return RemoteShards(str(shards)).dir / f"fid_stats-{feature_id}.npz"
    return Path(shards) / f"fid_stats-{feature_id}.npz"


def is_shard_folder(ref: str | os.PathLike) -> bool:
    """A local folder with a manifest, or any s3:// / gs:// / http(s):// folder (whose manifest is
    read, with its own errors, when it is used)."""
    from maskdm.shardformat.remote import is_remote
    return is_remote(ref) or (Path(ref) / "manifest.json").exists()


def shard_batches(reader, batch: int, rank: int = 0, world: int = 1,
                  skipped: list | None = None, limit: int | None = None):
    """Uint8 images of a shard folder in storage order; rank r takes samples r, r+world, ..."""
    from maskdm.preprocessing.preview import sample_image
    from maskdm.shardformat.reader import SampleError
    buf, pos = [], 0
    for s in range(len(reader.used)):
        for j in range(reader.shard_entry(s).samples):
            if limit is not None and pos >= limit:
                break
            mine = pos % world == rank
            pos += 1
            if not mine:
                continue
            try:
                img = sample_image(reader.read_at(s, j)[1], reader.image_size)
            except (SampleError, ValueError, OSError) as e:
                if skipped is not None:
                    skipped.append(f"{reader.shard_entry(s).name}#{j}: {e}")
                continue
            buf.append(img)
            if len(buf) == batch:
                yield buf
                buf = []
    if buf:
        yield buf


def shard_stats(net, feature_id: str, shards, *, batch: int, device, rank: int = 0,
                world: int = 1, limit: int | None = None, progress: bool = True) -> FIDStats:
    """Reference statistics of a shard folder (collective when ``world`` > 1)."""
    from maskdm.shardformat.manifest import DatasetError
    from maskdm.shardformat.reader import SampleError, ShardReader
    try:
        reader = ShardReader(shards)
    except (DatasetError, SampleError) as e:
        raise FIDError(f"{shards}: {e}") from None
    if reader.excluded:
        print(f"warning: {shards}: left out {len(reader.excluded)} shard(s): "
              f"{'; '.join(reader.excluded.values())}", file=sys.stderr)
    total = reader.num_samples if limit is None else min(limit, reader.num_samples)
    skipped: list[str] = []
    mine = len(range(rank, total, world))  # the bar follows rank 0's share
    bar = _bar(mine, f"reference {Path(shards).name}", progress and rank == 0)
    t0 = time.perf_counter()
    try:
        acc = accumulate(net, shard_batches(reader, batch, rank, world, skipped, limit),
                         net_dim(net), device, bar)
    finally:
        bar.close()
    acc.all_reduce()
    if skipped:
        print(f"warning: {len(skipped)} damaged sample(s) left out of the reference statistics "
              f"(run `maskdm shard --verify {shards}`): {'; '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
    n_skipped = int(dist.all_sum(len(skipped)))
    from maskdm.shardformat.remote import is_remote
    where = str(shards) if is_remote(shards) else str(Path(shards).resolve())
    stats = acc.stats(feature_id, where, n_skipped)
    if rank == 0 and progress:
        print(f"reference statistics of {stats.n} images in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    return stats


def reference_stats(ref: str | os.PathLike, net, feature_id: str, *, batch: int, device,
                    recompute: bool = False, progress: bool = True) -> FIDStats:
    """``ref`` is a shard folder (statistics cached beside its manifest), a statistics ``.npz``
    or a folder of images."""
    from maskdm.shardformat.fsutil import url_refusal
    if (refused := url_refusal(ref, "--ref", remote_ok=True)) is not None:
        raise FIDError(refused)
    if is_shard_folder(ref):
        path = stats_path(ref, feature_id)
        if path.exists() and not recompute:
            return FIDStats.load(path)
        if progress:
            print(f"computing reference statistics for {ref} (stored as {path}; done once)",
                  file=sys.stderr)
        stats = shard_stats(net, feature_id, ref, batch=batch, device=device, progress=progress)
        stats.save(path)
        return stats
    ref = Path(ref)
    if ref.suffix == ".npz":
        if not ref.is_file():
            raise FIDError(f"{ref} does not exist")
        stats = FIDStats.load(ref)
        if stats.feature_id not in (feature_id, "unknown"):
            raise FIDError(f"{ref} was computed with the feature network '{stats.feature_id}', "
                           f"this run uses '{feature_id}'; FIDs across networks are not "
                           f"comparable. Recompute the statistics with this network.")
        return stats
    if ref.is_dir():
        return folder_stats(net, feature_id, ref, batch=batch, device=device, progress=progress)
    raise FIDError(f"--ref {ref}: expected a shard folder (with manifest.json), a statistics "
                   f".npz or a folder of images")
