"""EMA schedules (maskdm's ratio warm-up and the authors' ema_pytorch power warm-up) and the
weight-decay groups, against independent reference computations."""

from __future__ import annotations

import pytest
import torch

from maskdm.pipeline.ema import EMA
from maskdm.pipeline.engine import param_groups


def _weights(n: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, generator=g).cumsum(0) * 0.1).tolist()


def _run(ema: EMA, module: torch.nn.Module, ws: list[float]) -> list[float]:
    out = []
    for step, w in enumerate(ws, start=1):  # the trainer calls update after each optimizer step
        with torch.no_grad():
            module.weight.fill_(w)
        ema.update(module, step)
        out.append(ema.shadow["weight"].item())
    return out


def _reference_power(ws, beta=0.999, every=10, start=100, power=2 / 3):
    """ema_pytorch's EMA as documented: a counter of update() calls (0-based) gates the update
    (every `every`-th call); up to `start` calls the EMA copies the model; then the decay is
    min(beta, 1 - (1 + epoch) ** -power) with epoch = counter - start - 1 (a copy while <= 0)."""
    ema, out = None, []
    for counter, w in enumerate(ws):
        if counter % every == 0:
            if counter <= start or ema is None:
                ema = w
            else:
                epoch = counter - start - 1
                d = 0.0 if epoch <= 0 else min(beta, 1 - (1 + epoch) ** -power)
                ema = ema - (ema - w) * (1 - d)
        out.append(ema)
    return out


def test_power_warmup_follows_the_authors_ema():
    ws = _weights(3000)
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(ws[0])
    ema = EMA(m, 0.999, every=10, warmup="power", power=2 / 3, start=100)
    got = _run(ema, m, ws)
    ref = _reference_power(ws)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ema.current_decay(12) is None and ema.current_decay(91) == 0.0
    # the horizon: decay 0.999 is reached after ~31.6k update calls (power 2/3)
    assert ema.current_decay(20001) < 0.999 and ema.current_decay(40001) == 0.999


def test_ratio_warmup_and_update_interval():
    ws = _weights(200)
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    got = _run(EMA(m, 0.999, every=3), m, ws)
    ref, e = [], 0.0
    for step, w in enumerate(ws, start=1):
        if step % 3 == 0:
            d = min(0.999, (1 + step) / (10 + step))
            e = d * e + (1 - d) * w
        ref.append(e)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_weight_decay_groups():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    net.no_weight_decay = lambda: {"0.bias", "1.weight", "1.bias"}
    groups = param_groups(net, 0.03, "matrices")
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]
    (everything,) = param_groups(net, 0.03, "all")
    assert len(everything["params"]) == 4 and everything["weight_decay"] == 0.03
