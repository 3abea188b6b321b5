"""Command-line front ends of evaluation: ``maskdm sample``, ``maskdm fid-stats``, ``maskdm fid``."""

from __future__ import annotations

import argparse
import sys

SAMPLE_EPILOG = """\
examples:
  maskdm sample --ckpt demo_output/runs/finetune --n 64 --out samples/demo
  maskdm sample --ckpt runs/celebahq256_maskdm_b_finetune --out samples/b  # the recipe's FID protocol
  maskdm sample --ckpt runs/x/export --n 10000 --steps 100 --out samples/x   # rerun to resume
  deepspeed --num_gpus 8 $(which maskdm) sample --ckpt runs/x --num-images 50000 --out samples/x
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a trained model into a PNG folder",
                       description="Sample a trained model (EMA weights by default) into "
                       "DIR/000000.png, 000001.png, ... Image i depends only on (model, --seed, "
                       "i, sampler settings, --batch), not on the number of ranks; rerunning the "
                       "same command completes a partly written folder.",
                       epilog=SAMPLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a run folder (newest checkpoint), a checkpoint folder or an export "
                   "folder from `maskdm export`")
    p.add_argument("--n", "--num-images", type=int, default=None, dest="n",
                   help="number of images (default: the recipe's eval.fid_samples, i.e. its "
                   "FID-N); spell it --num-images under torchrun/deepspeed, whose own argument "
                   "parsers would take --n for one of theirs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                   help="default: the recipe's eval.sampler (ddim if unknown)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the recipe's eval.steps, 50 if unknown)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta, 0 = deterministic (default: the recipe's eval.eta, 0 if "
                   "unknown)")
    p.add_argument("--seed", type=int, default=0, help="base seed (image i: mix(seed, i))")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass per rank")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="EMA weights (default) or the raw training weights of a checkpoint")
    p.add_argument("--class", type=int, default=None, dest="class_label",
                   help="conditional models: sample this class (default: image i gets class "
                   "i %% num_classes)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast for the network (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_sample)

    c = sub.add_parser(
        "score", help="weight-free metrics: SWD of samples, held-out denoising loss of a model",
        description="Quality metrics that need no downloaded weights. SWD: sliced Wasserstein "
        "distance of a folder of samples to a reference (Laplacian-pyramid 7x7 patches per level "
        "as in Karras et al. 2018, and whole images), x 1e3. Held-out loss: the eps-MSE of a "
        "model on held-out images at fixed timesteps with fixed noise. Both are relative "
        "measures, for comparing runs scored against the same reference with the same N; only "
        "FID (`maskdm fid`) is comparable with published numbers.",
        epilog="examples:\n  maskdm score --samples samples/run_a --ref data/celeba64\n"
        "  maskdm score --ckpt runs/run_a --heldout data/celeba64_heldout --json a.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--samples", metavar="DIR", default=None, help="folder of generated images")
    c.add_argument("--ref", metavar="REF", default=None,
                   help="reference: a shard folder or a folder of images (same resolution)")
    c.add_argument("--n", type=int, default=None,
                   help="use the first N samples (default: all); the reference is cut to match")
    c.add_argument("--patches", type=int, default=64,
                   help="random 7x7 patches per image and pyramid level (default 64)")
    c.add_argument("--ckpt", metavar="PATH", default=None,
                   help="a run, checkpoint or export folder, for the held-out loss")
    c.add_argument("--heldout", metavar="SHARDS", default=None,
                   help="shard folder of images the model did not train on")
    c.add_argument("--heldout-n", type=int, default=512,
                   help="held-out images to use, first in storage order (default 512)")
    c.add_argument("--weights", choices=("ema", "raw"), default="ema")
    c.add_argument("--batch", type=int, default=64, help="images per forward pass")
    c.add_argument("--seed", type=int, default=0, help="seed of the directions, patches, noise")
    c.add_argument("--json", metavar="FILE", default=None, help="also write the results here")
    c.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    c.set_defaults(func=_run_score)

    s = sub.add_parser("fid-stats", help="compute FID reference statistics of a shard folder",
                       description="Compute Inception statistics (mean, covariance) of every "
                       "image in a shard folder (inverse DWT, or the stored JPEGs) and store them "
                       "beside its manifest as fid_stats-<features>.npz. Done once per dataset; "
                       "`maskdm fid` and training-time FID reuse them.")
    s.add_argument("shards", metavar="SHARDS", help="shard folder made by `maskdm shard`")
    _add_common(s)
    s.add_argument("--force", action="store_true", help="recompute even if the file exists")
    s.add_argument("--max-images", type=int, default=None,
                   help="use only the first N images (storage order); default: all")
    s.set_defaults(func=run_fid_stats)

    f = sub.add_parser("fid", help="FID of a folder of samples against reference statistics",
                       description="FID-N of the images in --samples against --ref: a shard "
                       "folder (its statistics are computed and stored on first use), a "
                       "statistics .npz, or another folder of images.")
    f.add_argument("--samples", required=True, metavar="DIR", help="folder of generated images")
    f.add_argument("--ref", required=True, metavar="SHARDS|NPZ|DIR", help="the reference")
    f.add_argument("--n", type=int, default=None,
                   help="use the first N samples (default: all); the result is FID-N")
    f.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    _add_common(f)
    f.set_defaults(func=run_fid)


def _add_common(p) -> None:
    p.add_argument("--inception-weights", default=None, metavar="PTH",
                   help="path of pt_inception-2015-12-05-6726825d.pth (default: "
                   "$MASKDM_INCEPTION_WEIGHTS, then the torch hub cache)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run_sample(args) -> int:
    from maskdm.pipeline import dist
    from maskdm.pipeline.checkpoint import CheckpointError

    from .sample_folder import SampleError, load_sampling_model, sample_to_dir
    try:
        device = dist.setup_env(args.device)
        if dist_world() > 1:
            dist.init(device)
        gen = load_sampling_model(args.ckpt, weights=args.weights, device=device)
        _fill_from_protocol(args, gen.protocol)
        dist.print0(f"sampling {args.n} images from {gen.source} (step {gen.step}, "
                    f"{args.weights} weights, {gen.mcfg.preset}) with {args.sampler} "
                    f"{args.steps} steps, eta {args.eta}, seed {args.seed}, on "
                    f"{dist.world_size()} rank(s)")
        res = sample_to_dir(gen, args.out, args.n, seed=args.seed, sampler=args.sampler,
                            steps=args.steps, eta=args.eta, batch=args.batch,
                            class_label=args.class_label, precision=args.precision)
    except (SampleError, CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.print0(f"{res['n']} images in {res['out']} ({res['written']} written now, "
                f"{res['skipped_existing']} already there) in {res['seconds']:.0f} s")
    return 0  # maskdm's main ends the process group (dist.destroy)


FALLBACK = {"sampler": "ddim", "steps": 50, "eta": 0.0}


def _fill_from_protocol(args, protocol: dict | None) -> None:
    """Unset sampler settings come from the run's recipe (its FID protocol), else FALLBACK."""
    from .sample_folder import SampleError
    from_recipe = []
    for key in ("sampler", "steps", "eta"):
        if getattr(args, key) is None:
            if protocol and key in protocol:
                setattr(args, key, protocol[key])
                from_recipe.append(key)
            else:
                setattr(args, key, FALLBACK[key])
    if args.n is None:
        if not protocol or "fid_samples" not in protocol:
            raise SampleError("--n is needed: this model does not record its recipe's "
                              "eval.fid_samples")
        args.n = int(protocol["fid_samples"])
        from_recipe.append("n")
    if from_recipe:
        from maskdm.pipeline import dist
        dist.print0(f"using the recipe's evaluation protocol for {', '.join(from_recipe)} "
                    f"(override with --{' / --'.join(from_recipe)})")


def _run_score(args) -> int:
    from .score import run
    return run(args)


def dist_world() -> int:
    from ..dist import launch_world_size
    return launch_world_size()


def _net(args):
    from .fid import pick_device
    from .inception import load_inception
    device = pick_device(args.device)
    net, feature_id = load_inception(args.inception_weights, device)
    if not feature_id.startswith("inception-2015"):
        print(f"warning: {args.inception_weights} are not the standard FID Inception weights; "
              f"FIDs from them are not comparable with published numbers (features: "
              f"{feature_id})", file=sys.stderr)
    return net, feature_id, device


def run_fid_stats(args) -> int:

    from maskdm.shardformat.fsutil import url_refusal

    from .fid import FIDError, is_shard_folder, shard_stats, stats_path
    from .inception import MissingWeights
    try:
        if (refused := url_refusal(args.shards, "SHARDS", remote_ok=True)) is not None:
            raise FIDError(refused)
        if not is_shard_folder(args.shards):
            raise FIDError(f"{args.shards} is not a shard folder (no manifest.json); make one with "
                           f"`maskdm shard SRC {args.shards}`")
        net, feature_id, device = _net(args)
        path = stats_path(args.shards, feature_id)
        if path.exists() and not args.force:
            print(f"{path} already exists (use --force to recompute)")
            return 0
        stats = shard_stats(net, feature_id, args.shards, batch=args.batch, device=device,
                            limit=args.max_images)
        stats.save(path)
    except (FIDError, MissingWeights) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {stats.n} images, features {feature_id}"
          + (f", {stats.skipped} damaged sample(s) left out" if stats.skipped else ""))
    return 0


def run_fid(args) -> int:
    from maskdm.shardformat.fsutil import url_refusal

    from .fid import FIDError, folder_stats, frechet_distance, reference_stats
    from .inception import MissingWeights
    try:
        if (refused := url_refusal(args.samples, "--samples")) is not None:
            raise FIDError(refused)
        net, feature_id, device = _net(args)
        ref = reference_stats(args.ref, net, feature_id, batch=args.batch, device=device)
        gen = folder_stats(net, feature_id, args.samples, batch=args.batch, device=device,
                           limit=args.n)
        value = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    except (FIDError, MissingWeights) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"fid": value, "n": gen.n, "samples": gen.source, "reference": ref.source,
              "reference_n": ref.n, "features": feature_id}
    print(f"FID-{gen.n}: {value:.3f}  (samples {gen.source}; reference {ref.source}, "
          f"{ref.n} images; features {feature_id})")
    if args.json:
        from maskdm.shardformat.fsutil import atomic_write_json
        atomic_write_json(args.json, result)
    return 0
