"""Multi-head self-attention with one explicitly chosen kernel per model.

``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks its kernel (flash /
cuDNN / memory-efficient / math) unless ``sdpa_kernel`` names one. ``xformers``:
``xformers.ops.memory_efficient_attention`` (CUDA only). ``auto``: xformers when it is installed
*and* its kernels run on this device (checked once with a tiny call, since a wheel built for
another torch imports fine but has no operators), else sdpa. The model records why it chose.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

SdpaKernel = Literal["auto", "flash", "cudnn", "efficient", "math"]
SDPA_KERNELS = get_args(SdpaKernel)
_probe_cache: dict[str, tuple[bool, str]] = {}
_MEA = None  # xformers.ops.memory_efficient_attention, once a probe has run it


def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def xformers_usable(device: torch.device) -> tuple[bool, str]:
    """(usable, reason): can xformers' memory-efficient attention run on ``device``? Any failure
    of the import or of a tiny call (a wheel built for another torch imports fine but has no
    operators; a mismatched build may raise anything) means no: ``auto`` then uses sdpa."""
    global _MEA
    if device.type != "cuda":
        return False, f"xformers has no kernels for {device.type}"
    if not xformers_installed():
        return False, "xformers is not installed (pip install 'maskdm[xformers]')"
    key = str(device)
    if key not in _probe_cache:
        try:
            mea, op = _probe(device)
            _MEA = mea
            _probe_cache[key] = (True, f"xformers kernels run on this device{op}")
        except Exception as e:  # noqa: BLE001 (any failure: fall back, say why)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _probe_cache[key] = (False, f"xformers is installed but cannot run here "
                                        f"({type(e).__name__}: {first[:160]}); it must be built "
                                        f"for this torch/CUDA")
    return _probe_cache[key]


def _probe(device: torch.device):
    """Import xformers and run its kernel once on ``device`` -> (the kernel, which operator)."""
    import xformers.ops as xops
    q = torch.randn(1, 16, 2, 64, device=device, dtype=torch.bfloat16)
    xops.memory_efficient_attention(q, q, q)
    return xops.memory_efficient_attention, _xformers_op(q)


def _xformers_op(q: torch.Tensor) -> str:
    """Which of xformers' operators its dispatcher picks for bf16 inputs like ``q`` (a private
    API: best effort), and whether that is torch's own CUTLASS kernel (then an "xformers" row
    measures what sdpa's efficient kernel does)."""
    try:
        from xformers.ops import fmha
        op = fmha._dispatch_fw(fmha.Inputs(query=q, key=q, value=q), False)
        name = getattr(op, "NAME", type(op).__name__)
    except Exception:  # noqa: BLE001
        return ""
    torch_kernel = "cutlass" in name.lower() and "pt" in name.lower()
    note = ": torch's own CUTLASS kernel" if torch_kernel else ""
    return f" (operator {name}{note})"


def memory_efficient_attention(q, k, v):
    """xformers' kernel, imported once by ``xformers_usable`` (no import inside a compiled
    graph)."""
    if _MEA is None:
        raise RuntimeError("xformers attention was not set up: resolve_backend('xformers') first")
    return _MEA(q, k, v)


def resolve_backend(name: str, device: torch.device | str | None) -> tuple[str, str]:
    """``auto`` / ``sdpa`` / ``xformers`` -> (backend for ``device``, why), or a clear error."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "sdpa":
        return "sdpa", "requested"
    if name == "xformers":
        ok, why = xformers_usable(dev)
        if not ok:
            raise RuntimeError(f"model.attention=xformers: {why}; use sdpa or auto")
        return "xformers", "requested"
    if name == "auto":
        ok, why = xformers_usable(dev)
        return ("xformers", why) if ok else ("sdpa", why)
    raise ValueError(f"unknown attention backend {name!r}; use auto, sdpa or xformers")


def _sdpa_backend(kernel: str):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, backend: str, sdpa_kernel: str = "auto"):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend
        self.sdpa_kernel = sdpa_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)
        if self.backend == "xformers":
            q, k, v = qkv.unbind(2)  # [B, L, H, Dh]: xformers' native layout, no transpose
            out = memory_efficient_attention(q, k, v)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, Dh]
            if self.sdpa_kernel == "auto":
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                from torch.nn.attention import sdpa_kernel
                with sdpa_kernel(_sdpa_backend(self.sdpa_kernel)):
                    out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2)
        return self.proj(out.reshape(B, L, D))
