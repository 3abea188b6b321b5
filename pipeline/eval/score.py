"""``maskdm score``: weight-free quality metrics of samples and models.

- SWD (``swd.py``) of a folder of samples against a reference (a shard folder or a folder of
  images);
- held-out denoising loss (``heldout.py``) of a model on images of a shard folder it did not train
  on. Both are for relative comparisons (same reference, resolution and N); only FID (``maskdm
  fid``) is comparable with published numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


class ScoreError(RuntimeError):
    pass


def load_images(path: str | os.PathLike, n: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3]: the first ``n`` images (all if None) of a shard folder (storage order)
    or of a folder of images (sorted by name)."""
    from maskdm.shardformat.fsutil import url_refusal

    from .fid import list_images, load_image, shard_batches
    if (refused := url_refusal(path, "images", remote_ok=True)) is not None:
        raise ScoreError(refused)
    from maskdm.shardformat.remote import is_remote
    p = path if is_remote(path) else Path(path)
    if is_remote(path) or (p / "manifest.json").exists():
        from maskdm.shardformat.manifest import DatasetError
        from maskdm.shardformat.reader import SampleError, ShardReader
        try:
            reader = ShardReader(p)
        except (DatasetError, SampleError) as e:
            raise ScoreError(str(e)) from None
        out = [img for batch in shard_batches(reader, 256, limit=n) for img in batch]
    elif p.is_dir():
        files = list_images(p)
        out = [load_image(f) for f in files[:n]]
    else:
        raise ScoreError(f"{p}: expected a shard folder (with manifest.json) or a folder of images")
    if not out:
        raise ScoreError(f"{p} holds no readable image")
    sizes = {im.shape for im in out}
    if len(sizes) > 1:
        raise ScoreError(f"{p}: images of different sizes {sorted(sizes)[:3]}; SWD compares sets "
                         f"of one size")
    return np.stack(out)


def score_swd(samples: str, ref: str, *, n: int | None, seed: int, patches: int) -> dict:
    from maskdm.shardformat.fsutil import url_refusal

    from .swd import swd_scores
    for value, name in ((samples, "--samples"), (ref, "--ref")):  # before reading anything
        if (refused := url_refusal(value, name, remote_ok=True)) is not None:
            raise ScoreError(refused)
    a = load_images(samples, n)
    b = load_images(ref, len(a))
    if a.shape[1:] != b.shape[1:]:
        raise ScoreError(f"--samples are {a.shape[2]}x{a.shape[1]} but --ref {b.shape[2]}x"
                         f"{b.shape[1]}; score against a reference of the same resolution")
    if len(b) < len(a):
        print(f"note: --ref holds only {len(b)} images; both sets are cut to {len(b)}",
              file=sys.stderr)
    return swd_scores(a, b, patches=patches, seed=seed)


def score_heldout(ckpt: str, heldout: str, *, n: int, seed: int, batch: int, device,
                  weights: str = "ema") -> dict:
    import torch

    from maskdm.pipeline.data.transform import to_model_space

    from .heldout import heldout_loss
    from .sample_folder import load_sampling_model
    gen = load_sampling_model(ckpt, weights=weights, device=device)
    images = load_images(heldout, n)
    if images.shape[1] != gen.image_size:
        raise ScoreError(f"--heldout images are {images.shape[1]}px, the model was trained on "
                         f"{gen.image_size}px")
    if gen.mcfg.num_classes:
        raise ScoreError("the held-out loss is defined for unconditional models only")
    x0 = to_model_space(torch.from_numpy(images), "jpeg", None, gen.space, device)
    res = heldout_loss(gen.net, gen.diffusion, x0, seed=seed, batch=batch)
    return {**res, "heldout_n": len(images), "step": gen.step}


def run(args) -> int:
    from maskdm.pipeline import dist
    if not args.samples and not args.ckpt:
        print("error: give --samples DIR --ref REF (SWD), --ckpt RUN --heldout SHARDS (held-out "
              "loss), or both", file=sys.stderr)
        return 2
    if bool(args.samples) != bool(args.ref):
        print("error: --samples and --ref go together", file=sys.stderr)
        return 2
    if bool(args.ckpt) != bool(args.heldout):
        print("error: --ckpt and --heldout go together", file=sys.stderr)
        return 2
    results: dict = {}
    t0 = time.time()
    try:
        if args.samples:
            results.update(score_swd(args.samples, args.ref, n=args.n, seed=args.seed,
                                     patches=args.patches))
        if args.ckpt:
            device = dist.setup_env(args.device)
            results.update(score_heldout(args.ckpt, args.heldout, n=args.heldout_n,
                                         seed=args.seed, batch=args.batch, device=device,
                                         weights=args.weights))
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. a damaged checkpoint: say what, no traceback
        from maskdm.pipeline.checkpoint import CheckpointError

        from .sample_folder import SampleError
        if isinstance(e, (CheckpointError, SampleError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    _print(results)
    if args.json:
        from maskdm.shardformat.fsutil import atomic_write_json
        atomic_write_json(args.json, {**results, "samples": args.samples, "ref": args.ref,
                                      "ckpt": args.ckpt, "heldout": args.heldout,
                                      "seed": args.seed, "seconds": round(time.time() - t0, 1)})
    return 0


def _print(results: dict) -> None:
    if "swd_patch" in results:
        levels = sorted((k for k in results if k.startswith("swd_") and k[4:].isdigit()),
                        key=lambda k: -int(k[4:]))
        print(f"SWD x1e3 over {results['n']} images (lower is better; relative measure):")
        for k in levels:
            print(f"  {k[4:]:>4}px patches  {results[k]:8.2f}")
        print(f"  patch average  {results['swd_patch']:8.2f}")
        print(f"  whole images   {results['swd_image']:8.2f}")
    if "loss" in results:
        print(f"held-out denoising loss (eps-MSE, {results['heldout_n']} images, model step "
              f"{results['step']}; lower is better; relative measure): {results['loss']:.5f}")
        print("  " + "  ".join(f"t={k[6:]}: {v:.4f}" for k, v in results.items()
                               if k.startswith("loss_t")))
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}))
