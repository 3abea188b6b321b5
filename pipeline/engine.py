"""Model + AdamW + warmup schedule -> a DeepSpeed engine (every run, one process included)."""

from __future__ import annotations

import torch

from maskdm.model import ModelConfig, build_model

from . import masters
from .config import Config, precision_of
from .weights import load_strict


def param_groups(net, weight_decay: float, on: str = "matrices") -> list[dict]:
    """AdamW groups. ``on="matrices"``: biases, norms and embeddings get no weight decay;
    ``on="all"``: every parameter decays (as in the paper's authors' code)."""
    if on == "all":
        return [{"params": list(net.parameters()), "weight_decay": weight_decay}]
    skip = net.no_weight_decay()
    decay = [p for n, p in net.named_parameters() if n not in skip]
    no_decay = [p for n, p in net.named_parameters() if n in skip]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_lambda(warmup_steps: int):
    def f(step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    return f


def build_engine(cfg: Config, mcfg: ModelConfig, device: torch.device, ds_config: dict,
                 init_weights: dict[str, torch.Tensor] | None = None,
                 init_fresh: set[str] = frozenset()):
    """-> (engine, net). ``init_weights`` (fine-tuning) are loaded with strict key matching; the
    keys in ``init_fresh`` keep their initial values (``weights.transfer_weights``)."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net = build_model(mcfg, device=device)
    if init_weights is not None:
        load_strict(net, init_weights, f"the weights of train.init_from={cfg.train.init_from}",
                    init_fresh)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(net, o.weight_decay, o.weight_decay_on), lr=o.lr,
                                  betas=tuple(o.betas), eps=o.eps,
                                  fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(o.warmup_steps))
    # bf16/fp16: DeepSpeed rounds the module and builds its fp32 masters from the rounded copy;
    # the masters get the exact initial (or fine-tuning start) weights back from this copy
    exact = {n: p.detach().clone() for n, p in net.named_parameters()} \
        if precision_of(ds_config) != "fp32" else None
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    if exact is not None:
        masters.write(engine.module, engine.optimizer, exact)
        del exact
    if cfg.train.compile:
        engine.compile()
    return engine, net
