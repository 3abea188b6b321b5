"""Evaluation throughput: sampling img/s per network forward and FID Inception img/s.

    python -m benchmarks.sampling                                  # GPU: MaskDM-B/L at 256 px
    python -m benchmarks.sampling --presets tiny --image-size 32 --batch 16 --inception-batch 8

Sampling rows time DDIM steps of a randomly initialised model (weights do not change the cost) in
bf16 autocast on CUDA, fp32 on CPU, and report images per second per sampling step, i.e. what one
step of a K-step chain costs: a K-step run delivers (rate / K) img/s. The Inception row times FID
feature extraction (resize to 299 + Inception-v3) on uint8 images of ``--image-size``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from maskdm.model import ModelConfig, build_model
from maskdm.model.diffusion import GaussianDiffusion, seeded_generators, seeded_noise


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["MaskDM-B", "MaskDM-L"])
    ap.add_argument("--image-size", type=int, default=256, help="pixels (DWT input is half)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps per timed chain")
    ap.add_argument("--inception-batch", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# {datetime.date.today()} {name}, torch {torch.__version__}, "
          f"{'bf16 autocast' if dtype else 'fp32'}")
    print("| what | batch | image forwards/s | 50-step DDIM img/s | 10k images with DDIM-100 |")
    print("|---|---|---|---|---|")
    diffusion = GaussianDiffusion("cosine", 1000)
    noise_rows = []
    for preset in args.presets:
        mcfg = ModelConfig(preset=preset, in_channels=12, input_size=args.image_size // 2,
                           patch_size=2, attention="sdpa").resolved()
        net = build_model(mcfg, device=device).eval()
        shape = (args.batch, 12, mcfg.input_size, mcfg.input_size)
        seeds = list(range(args.batch))

        def run(net=net, shape=shape, seeds=seeds):
            diffusion.sample(net, shape, sampler="ddim", steps=args.steps, seeds=seeds,
                             device=device, autocast_dtype=dtype)
        per_step = args.batch * args.steps / timed(run, device, args.reps)
        hours = 10_000 * 100 / per_step / 3600
        print(f"| sample {preset} ({mcfg.num_tokens} tokens) | {args.batch} | {per_step:.0f} | "
              f"{per_step / 50:.1f} | {hours:.2f} h |", flush=True)
        noise_rows.append((preset, args.batch / per_step, shape, seeds))
    from maskdm.pipeline.eval.inception import FIDInception
    inc = FIDInception().eval().to(device)
    imgs = torch.randint(0, 256, (args.inception_batch, args.image_size, args.image_size, 3),
                         dtype=torch.uint8, device=device)

    def feats():
        with torch.no_grad():
            inc(imgs)
    rate = args.inception_batch / timed(feats, device, args.reps)
    print(f"| FID Inception features ({args.image_size} px) | {args.inception_batch} | {rate:.0f} | "
          f"| {10_000 / rate / 60:.1f} min per 10k |")
    # a DDPM (or DDIM eta > 0) step also draws each image's noise from its own seed's generator:
    # one launch per image; its share of the step against the model's forward, and against one
    # batched draw (what it would cost without the per-image streams)
    print("\n| seeded noise per step | batch | ms per image-seeded draw | ms one batched draw | "
          "share of a DDPM step |")
    print("|---|---|---|---|---|")
    for preset, step_s, shape, seeds in noise_rows:
        gens = seeded_generators(seeds, device)
        per_image = timed(lambda: seeded_noise(gens, shape[1:], device), device, args.reps)
        batched = timed(lambda: torch.randn(shape, device=device), device, args.reps)
        print(f"| {preset} | {shape[0]} | {per_image * 1e3:.2f} | {batched * 1e3:.2f} | "
              f"{per_image / (step_s + per_image):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
