"""Run by tests/test_masters.py, in one process or on 2 ranks under torchrun: builds the real
DeepSpeed engine of configs/test_tiny.yaml at a ZeRO stage and precision, checks that the fp32
masters start from the exact fp32 initial weights, trains 3 steps with an EMA of decay 0 (a copy
of the weights at every step) and writes what the test compares to ``OUT/rank{r}.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from maskdm.model import build_model
from maskdm.pipeline import dist, masters
from maskdm.pipeline.config import deepspeed_config, load_config
from maskdm.pipeline.ema import EMA
from maskdm.pipeline.engine import build_engine

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"


def full_masters(engine) -> dict[str, torch.Tensor]:
    """Whole fp32 masters by DeepSpeed's own accessor (a collective under ZeRO 1-3) or, at
    ZeRO 0, the optimizer's per-parameter copy."""
    from deepspeed.utils import safe_get_full_fp32_param
    found = masters.find(engine.module, engine.optimizer)
    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = found.pieces[n][0].master.view(p.shape)
        out[n] = full.detach().float().cpu().clone()
    return out


def main() -> None:
    zero, precision, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    cfg = load_config([str(CONFIG)], [f"train.zero_stage={zero}", f"train.precision={precision}",
                                      "optim.lr=1e-2"])
    mcfg = cfg.model_config(32)
    device = torch.device("cpu")
    dist.init(device)
    world, rank = dist.world_size(), dist.rank()
    torch.manual_seed(cfg.train.seed)  # the initial weights build_engine makes
    exact = {n: p.detach().clone() for n, p in build_model(mcfg, device=device).named_parameters()}
    engine, _ = build_engine(cfg, mcfg, device, deepspeed_config(cfg, world))
    start = full_masters(engine)
    ema = EMA(engine.module, 0.0, optimizer=engine.optimizer)
    ema_start = ema.full_state_dict()
    gen = torch.Generator().manual_seed(100 + rank)
    dtype = next(engine.module.parameters()).dtype if zero < 3 else torch.float32
    for step in range(1, 4):
        x = torch.randn(4, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = engine(x.to(dtype) if zero < 3 else x, t).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(engine.module, step)
    trained = full_masters(engine)
    ema_end = ema.full_state_dict()
    rounded = {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().float().clone()
               for n, p in engine.module.named_parameters()}
    torch.save({"exact": exact, "start": start, "ema_start": ema_start, "trained": trained,
                "ema_end": ema_end, "rounded": rounded, "world": world},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
    dist.destroy()
