"""Exponential moving average of the weights, correct under every ZeRO stage.

ZeRO 0-2 keep full parameters on every rank: the EMA is a full fp32 copy (identical on all
ranks). Under ZeRO-3 a rank holds only its partition of each parameter (``param.ds_tensor``): the
EMA then averages that partition, with no communication; ``full_state_dict`` all-gathers the
partitions (every rank must call it) and ``merge_partitions`` does the same offline from the
per-rank checkpoint files.

The decay warms up so that early weights do not dominate, in one of two ways (``optim.ema_warmup``):
- ``ratio``: ``min(decay, (1 + step) / (10 + step))`` at every ``every``-th step (maskdm's default);
- ``power``: the schedule of the ``ema_pytorch`` package the paper's authors used: counting optimizer
  steps from 0 as ``c``, the EMA is updated when ``c % every == 0``; it copies the weights while
  ``c <= start + 1`` and then uses ``min(decay, 1 - (c - start) ** -power)``. With ``every = 10``,
  ``power = 2/3``, ``start = 100`` and decay 0.999 (the authors' settings) the averaging horizon is
  ~1000 updates = ~10k steps, against ~1k steps for ``ratio`` at every step.
The decay is a function of the step alone, so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, *, every: int = 1,
                 warmup: str = "ratio", power: float = 2 / 3, start: int = 100):
        if warmup not in ("ratio", "power"):
            raise ValueError(f"EMA warmup must be 'ratio' or 'power', got {warmup!r}")
        self.decay, self.every, self.warmup, self.power, self.start = \
            decay, int(every), warmup, float(power), int(start)
        params = list(module.named_parameters())
        self.zero3 = any(_is_zero3_param(p) for _, p in params)
        self.names = [n for n, _ in params]
        self.meta = {n: {"shape": list(p.ds_shape if self.zero3 else p.shape),
                         "numel": int(p.ds_numel if self.zero3 else p.numel())} for n, p in params}
        with torch.no_grad():
            self.shadow = {n: self._local(p).detach().float().clone() for n, p in params}

    def _local(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    def current_decay(self, step: int) -> float | None:
        """Decay applied after optimizer step ``step`` (1-based); None: no update at this step,
        0.0: copy the weights."""
        if self.warmup == "power":
            c = step - 1
            if c % self.every:
                return None
            epoch = c - self.start - 1
            return 0.0 if epoch <= 0 else min(self.decay, 1.0 - (1.0 + epoch) ** -self.power)
        if step % self.every:
            return None
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.current_decay(step)
        if d is None:
            return
        shadows, currents = [], []
        for n, p in module.named_parameters():
            shadows.append(self.shadow[n])
            cur = self._local(p).detach()
            currents.append(cur if cur.dtype == torch.float32 else cur.float())
        torch._foreach_lerp_(shadows, currents, 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "zero3": self.zero3, "meta": self.meta,
                "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["zero3"] != self.zero3:
            raise RuntimeError("EMA checkpoint and run disagree on ZeRO-3 partitioning")
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise RuntimeError(f"EMA state does not match the model: missing {sorted(missing)}, "
                               f"unexpected {sorted(unexpected)}")
        for n, t in state["shadow"].items():
            if t.shape != self.shadow[n].shape:
                raise RuntimeError(f"EMA {n}: checkpoint {tuple(t.shape)} vs model "
                                   f"{tuple(self.shadow[n].shape)} (different world size under "
                                   f"ZeRO-3?)")
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Whole EMA weights (``merge_partitions`` of a checkpoint written by another number of
        ranks) -> this rank's partitions: ZeRO-3 keeps rank r's contiguous slice of each flattened
        parameter (padded at the end), the layout ``_assemble`` undoes."""
        missing = set(self.shadow) - set(full)
        if missing or set(full) - set(self.shadow):
            raise RuntimeError(f"EMA weights do not match the model: missing {sorted(missing)}, "
                               f"unexpected {sorted(set(full) - set(self.shadow))}")
        rank = dist.get_rank() if self.zero3 else 0
        for n, shadow in self.shadow.items():
            flat = full[n].float().flatten()
            if not self.zero3:
                shadow.copy_(flat.view_as(shadow))
                continue
            k = shadow.numel()
            part = flat[rank * k:(rank + 1) * k]
            shadow.zero_()
            shadow.view(-1)[:len(part)].copy_(part)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights (CPU). Under ZeRO-3 this is a collective: call it on all ranks."""
        if not self.zero3:
            return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}
        world = dist.get_world_size()
        out = {}
        for n in self.names:
            part = self.shadow[n]
            parts = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(parts, part)
            out[n] = _assemble([p.cpu() for p in parts], self.meta[n])
        return out


def _assemble(parts: list[torch.Tensor], meta: dict) -> torch.Tensor:
    flat = torch.cat([p.flatten() for p in parts])[: meta["numel"]]
    return flat.view(meta["shape"]).clone()


def merge_partitions(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full EMA weights from the per-rank EMA states of a ZeRO-3 checkpoint (rank order)."""
    if not states[0]["zero3"]:
        return {n: t.clone() for n, t in states[0]["shadow"].items()}
    meta = states[0]["meta"]
    return {n: _assemble([s["shadow"][n] for s in states], meta[n]) for n in meta}
