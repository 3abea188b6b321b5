"""Training-step throughput of the U-ViT: img/s, achieved TFLOP/s (analytic count) and MFU.

    python -m benchmarks.train_step                       # GPU: MaskDM-B/L, ratios 0/.5/.7/.9
    python -m benchmarks.train_step --presets tiny --batch 8 --input 16   # a CPU-sized run
    python -m benchmarks.train_step --presets MaskDM-L --ratios 0 --batch 32 --checkpointing

Each row times full training steps: timesteps, noise and masks drawn as the trainer draws them
(``pipeline.randomness.draw_step``), forward on the visible tokens, MSM loss, backward and a fused AdamW update, under bf16
autocast on CUDA (fp32 on CPU). MFU divides the achieved rate by a matmul peak measured here on the
same device (bf16 8192^3 on CUDA, fp32 2048^3 on CPU). ``--compile`` wraps the model in
torch.compile and falls back to eager (saying so) if compilation fails.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from maskdm.model import ModelConfig, build_model
from maskdm.model.diffusion import GaussianDiffusion
from maskdm.model.flops import train_step_flops
from maskdm.model.masks import patch
from maskdm.model.objective import DiffusionObjective
from maskdm.pipeline.bench_train import matmul_peak, sync
from maskdm.pipeline.randomness import draw_step


class _Batch:
    def __init__(self, x0):
        self.x0, self.labels = x0, None


def bench_one(preset: str, ratio: float, attention: str, batch: int, args,
              device: torch.device) -> dict:
    ckpt = True if args.checkpointing == -1 else args.checkpointing
    cfg = ModelConfig(preset=preset, in_channels=args.channels, input_size=args.input,
                      patch_size=args.patch, attention=attention, sdpa_kernel=args.sdpa_kernel,
                      checkpointing=ckpt, dwt_tokens=args.dwt_tokens).resolved()
    row = {"preset": preset, "ratio": ratio, "attention": attention, "batch": batch,
           "compile": "off"}
    spec = patch(ratio)
    spec.validate(cfg.grid)
    S = spec.num_visible(cfg.grid) * cfg.token_groups
    row["tokens"] = S
    try:
        torch.manual_seed(0)
        if args.compile:
            torch._dynamo.reset()  # a fresh compile per configuration, no shape-driven recompiles
        net = build_model(cfg, device=device)
        row["attention"] = net.attention_backend
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.99, 0.99),
                                weight_decay=0.03, fused=device.type == "cuda")
        fn = net
        if args.compile:
            try:
                fn = torch.compile(net)
                row["compile"] = "on"
            except Exception as e:  # compile is an optimisation: report and carry on eagerly
                print(f"  torch.compile unavailable ({type(e).__name__}: {e}); eager")
        obj = DiffusionObjective(GaussianDiffusion("cosine", 1000), cfg.patch_size,
                                 cfg.group_channels)
        x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size,
                         device=device).clamp(-1, 1)
        amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step(i: int) -> torch.Tensor:
            r = draw_step(0, i, batch, 0, batch, x0.shape[1:], 1000, spec, cfg.grid, device,
                          groups=cfg.token_groups)
            with torch.autocast(**amp):
                loss = obj(fn, _Batch(x0), r.keep_idx, r.t, r.noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup):
            try:
                step(i)
            except Exception as e:
                if fn is net or i > 0:
                    raise
                print(f"  torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager")
                fn, row["compile"] = net, "failed"
                step(i)
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(args.warmup + i)
        sync(device)
        dt = time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        row["img_s"] = batch * args.steps / dt
        row["tflops"] = row["img_s"] * train_step_flops(cfg, S) / 1e12
        row["mem_gib"] = (torch.cuda.max_memory_allocated() / 2 ** 30
                          if device.type == "cuda" else float("nan"))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.5, 0.7, 0.9])
    ap.add_argument("--attention", nargs="+", default=None,
                    help="backends (default: sdpa and xformers on CUDA, sdpa on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="per-step batch (default 32 GPU, 4 CPU)")
    ap.add_argument("--channels", type=int, default=12)
    ap.add_argument("--input", type=int, default=None, help="model input side (default 128 GPU, 16 CPU)")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--dwt-tokens", choices=["joint", "split"], default="joint",
                    help="split: LL and detail bands as separate tokens (the authors' layout; "
                    "use --patch 4 for their 2048 tokens at 256 px)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--checkpointing", type=int, default=0, metavar="K",
                    help="activation checkpointing of the first K blocks (-1: all; default 0)")
    ap.add_argument("--sdpa-kernel", default="auto",
                    choices=["auto", "flash", "cudnn", "efficient", "math"],
                    help="force one SDPA kernel (default: PyTorch's choice)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.batch = args.batch or (32 if gpu else 4)
    args.input = args.input or (128 if gpu else 16)
    args.steps = args.steps or (10 if gpu else 3)
    presets = args.presets or (["MaskDM-B", "MaskDM-L"] if gpu else ["tiny", "MaskDM-S"])
    backends = args.attention or (["sdpa", "xformers"] if gpu else ["sdpa"])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine())
    rows = []
    for preset in presets:
        for ratio in args.ratios:
            for att in backends:
                if att == "xformers" and not gpu:
                    continue
                try:
                    row = bench_one(preset, ratio, att, args.batch, args, device)
                except RuntimeError as e:
                    row = {"preset": preset, "ratio": ratio, "attention": att,
                           "batch": args.batch, "tokens": "-", "compile": "-", "error": str(e)[:60]}
                rows.append(row)
                print(_fmt(row, peak), flush=True)
    print(f"\ntraining step, {name}, torch {torch.__version__}, "
          f"{'bf16 autocast' if gpu else 'fp32'}, input {args.channels}x{args.input}x{args.input} "
          f"patch {args.patch} ({args.dwt_tokens} tokens), checkpointing {args.checkpointing}, sdpa kernel "
          f"{args.sdpa_kernel}, {datetime.date.today().isoformat()}")
    print(f"matmul peak measured: {peak / 1e12:.1f} TFLOP/s")
    print(_header())
    for row in rows:
        print(_fmt(row, peak))


def _header() -> str:
    return (f"{'preset':<10}{'mask':>6}{'tokens':>8}{'attention':>11}{'batch':>7}{'compile':>9}"
            f"{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'mem GiB':>9}")


def _fmt(r: dict, peak: float) -> str:
    head = (f"{r['preset']:<10}{r['ratio']:>6.2f}{str(r.get('tokens', '-')):>8}"
            f"{r['attention']:>11}{r['batch']:>7}{r.get('compile', '-'):>9}")
    if "error" in r:
        return head + f"  {r['error']}"
    return head + (f"{r['img_s']:>10.1f}{r['tflops']:>10.3g}{r['tflops'] * 1e12 / peak:>8.1%}"
                   f"{r['mem_gib']:>9.1f}")


if __name__ == "__main__":
    main()
