"""Attention kernels at U-ViT shapes: forward+backward TFLOP/s for each SDPA kernel and xformers.

    python -m benchmarks.attention [--batch 32] [--heads 12] [--tokens 4097 1230 411] [--dim 64]

FLOPs: 4 * B * H * L^2 * d forward (QK^T and PV), 2.5x that for forward + backward. bf16, CUDA only.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4097, 1230, 411])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    from maskdm.model.attention import xformers_usable
    xf_ok, xf_why = xformers_usable(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; xformers: {xf_why}")
    print(f"{'kernel':<16}{'tokens':>8}{'fwd TF/s':>10}{'fwd+bwd TF/s':>14}")
    for L in args.tokens:
        B, H, d = args.batch, args.heads, args.dim
        q, k, v = (torch.randn(B, H, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        # the model's layout: views of one fused qkv projection output [B, L, 3, H, d]
        qkv = torch.randn(B, L, 3, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def model_layout():
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        flops = 4 * B * H * L * L * d
        runs = {name: (lambda be=be: _sdpa(q, k, v, be, sdpa_kernel)) for name, be in kernels.items()}
        for name in ("sdpa-flash", "sdpa-cudnn"):
            runs[name + "/qkv"] = (lambda be=kernels[name]: _sdpa(*model_layout(), be, sdpa_kernel))
        if xf_ok:
            import xformers.ops as xops
            qx, kx, vx = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            runs["xformers"] = lambda: xops.memory_efficient_attention(qx, kx, vx)
        for name, fwd in runs.items():
            try:
                with torch.no_grad():
                    tf = _time(fwd)
                out = fwd()
                grad = torch.randn_like(out)
                tfb = _time(lambda: fwd().backward(grad))
                print(f"{name:<16}{L:>8}{flops / tf / 1e12:>10.0f}{3.5 * flops / tfb / 1e12:>14.0f}")
            except RuntimeError as e:
                print(f"{name:<16}{L:>8}  unavailable: {str(e).splitlines()[0][:70]}")


def _sdpa(q, k, v, backend, ctx):
    with ctx(backend):
        return F.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    main()
