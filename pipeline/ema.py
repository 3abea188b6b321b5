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

Under bf16/fp16 the module's parameters are rounded copies; given DeepSpeed's ``optimizer`` the EMA
averages the fp32 master weights instead (``pipeline/masters.py``). Under ZeRO 1/2 each rank holds
the masters of its slice only: it updates that part of its whole copy, and ``sync`` (a collective,
run before the EMA is read: ``full_state_dict``, ``checkpoint.save``) assembles the parts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import masters as masters_of

SYNC_CHUNK = 1 << 26  # elements per all-reduce of ``sync`` (256 MiB of fp32)


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, *, every: int = 1,
                 warmup: str = "ratio", power: float = 2 / 3, start: int = 100,
                 optimizer=None):
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
        self.optimizer = optimizer  # DeepSpeed's: where the fp32 masters of a bf16/fp16 run are
        self._owned: dict[str, list[tuple[int, int]]] = {}  # ZeRO 1/2: this rank's parts
        self._stale = False  # the parts of other ranks changed since the last sync
        self._from_masters(module, 0.0)  # start from the fp32 values, not their rounding
        self.sync()

    @torch.no_grad()
    def _from_masters(self, module: torch.nn.Module, weight: float) -> set[str]:
        """Lerp the pieces of the shadow this rank holds masters of toward them; -> the names
        done (the others are their own masters)."""
        found = masters_of.find(module, self.optimizer) if self.optimizer is not None else None
        if found is None:
            return set()
        shadows, currents = [], []
        for n, pieces in found.pieces.items():
            flat = self.shadow[n].view(-1)
            for piece in pieces:
                shadows.append(flat.narrow(0, piece.local_start, piece.numel))
                currents.append(piece.master)
        if shadows:
            torch._foreach_lerp_(shadows, currents, 1.0 - weight)
        self._owned = {n: [(pc.local_start, pc.numel) for pc in found.pieces[n]]
                       for n in found.split}
        self._stale = self._stale or bool(found.split)
        return {n for n, pieces in found.pieces.items() if pieces or n in found.split}

    @torch.no_grad()
    def sync(self) -> None:
        """Collective: every rank calls it. Under ZeRO 1/2 with bf16/fp16 each rank updated only
        its slice of the whole copy; afterwards every rank holds the whole current EMA. A no-op
        otherwise."""
        if not self._stale:
            return
        self._stale = False
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        names = sorted(self._owned)
        while names:
            chunk, total = [], 0
            while names and (not chunk or total + self.shadow[names[0]].numel() <= SYNC_CHUNK):
                chunk.append(names.pop(0))
                total += self.shadow[chunk[-1]].numel()
            buf = torch.zeros(total, dtype=torch.float32, device=self.shadow[chunk[0]].device)
            offset = 0
            for n in chunk:  # each element is held by exactly one rank: the sum assembles them
                flat = self.shadow[n].view(-1)
                for start, numel in self._owned[n]:
                    buf[offset + start:offset + start + numel] = flat[start:start + numel]
                offset += flat.numel()
            dist.all_reduce(buf)
            offset = 0
            for n in chunk:
                flat = self.shadow[n].view(-1)
                flat.copy_(buf[offset:offset + flat.numel()])
                offset += flat.numel()

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
        done = self._from_masters(module, d)
        shadows, currents = [], []
        for n, p in module.named_parameters():
            if n in done:
                continue
            shadows.append(self.shadow[n])
            cur = self._local(p).detach()
            currents.append(cur if cur.dtype == torch.float32 else cur.float())
        if shadows:
            torch._foreach_lerp_(shadows, currents, 1.0 - d)

    def state_dict(self) -> dict:
        if self._stale:
            raise RuntimeError("the EMA is split over ranks: call sync() on every rank first")
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
        self._stale = False  # every rank loaded the whole EMA

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
        self._stale = False

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights (CPU). A collective under ZeRO-3 and under ZeRO 1/2 with
        bf16/fp16 (``sync``): call it on all ranks."""
        self.sync()
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
