"""Where DeepSpeed keeps the fp32 master weights of a bf16/fp16 run.

Under ``bf16``/``fp16`` DeepSpeed casts the module's parameters to the low precision and keeps
the values the optimizer updates as fp32 *masters* inside its optimizer, laid out per ZeRO stage:

- ZeRO 0: ``FP16_UnfusedOptimizer`` holds one fp32 tensor per parameter (``fp32_groups``),
  ``FP16_Optimizer`` one flat fp32 tensor per parameter group (``fp32_groups_flat``);
- ZeRO 1/2: each rank holds a slice of the flattened groups; a parameter's part of this rank's
  slice is its ``_hp_mapping`` (a parameter may be split between ranks, or not here at all);
- ZeRO 3: each rank holds the fp32 copy of its partition of every parameter
  (``_z3_optimizer.get_local_fp32_param``).

``pieces`` names, for every parameter, the fp32 master views this rank holds, so that the EMA can
average the masters rather than their rounded copies and the engine can start from fp32 weights
(``write``). fp32 runs have no separate masters: ``pieces`` returns None and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOW = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Piece:
    """``master`` (fp32, 1-D, a view into the optimizer's buffer) holds elements
    ``[start, start + numel)`` of the flattened parameter; ``local_start`` is the same offset in
    what this rank keeps of the parameter (its ZeRO-3 partition; else equal to ``start``)."""
    start: int
    local_start: int
    master: torch.Tensor

    @property
    def numel(self) -> int:
        return self.master.numel()


@dataclass
class Masters:
    """This rank's master pieces of every parameter, by name. ``split``: the names whose masters
    are spread over ranks by ZeRO 1/2 (each element on exactly one rank): a copy kept whole on
    every rank must be re-assembled from all ranks after it was updated piecewise."""
    pieces: dict[str, list[Piece]]
    split: list[str]


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def low_precision(module: torch.nn.Module) -> bool:
    return any(_local(p).dtype in LOW for p in module.parameters())


def find(module: torch.nn.Module, optimizer) -> Masters | None:
    """This rank's fp32 masters of ``module`` inside DeepSpeed's ``optimizer``; None when the
    parameters are their own masters (fp32 training). Raises RuntimeError on a layout this
    module does not know (a DeepSpeed version that moved them), rather than averaging the
    rounded copies unnoticed."""
    if not low_precision(module):
        return None
    named = list(module.named_parameters())
    names = {id(p): n for n, p in named}
    pieces: dict[str, list[Piece]] = {n: [] for n, _ in named}
    split: list[str] = []
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3: the rank's partition, whole
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for n, p in named:
            opt = getattr(p, "_z3_optimizer", None)
            if opt is None or not p.requires_grad:
                continue
            local = opt.get_local_fp32_param(p).view(-1)
            k = p.ds_tensor.ds_numel
            pieces[n].append(Piece(rank * k, 0, local))
        return Masters(pieces, split)
    if any(hasattr(p, "_hp_mapping") for _, p in named):  # ZeRO 1/2 (and BF16_Optimizer)
        for n, p in named:
            if not hasattr(p, "_hp_mapping"):
                continue
            split.append(n)
            mapping = p._hp_mapping
            if mapping is None:  # held by other ranks only
                continue
            start = mapping.lp_fragment_address.start
            pieces[n].append(Piece(start, start, mapping.get_hp_fragment().view(-1)))
        return Masters(pieces, split)
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is not None and hasattr(optimizer, "fp32_groups"):  # ZeRO 0, unfused
        for group, masters in zip(groups, optimizer.fp32_groups):
            for p, m in zip(group, masters):
                if id(p) in names:
                    pieces[names[id(p)]].append(Piece(0, 0, m.view(-1)))
        return Masters(pieces, split)
    if groups is not None and hasattr(optimizer, "fp32_groups_flat"):  # ZeRO 0, fused
        for group, flat in zip(groups, optimizer.fp32_groups_flat):
            offset = 0
            for p in group:
                if id(p) in names:
                    pieces[names[id(p)]].append(Piece(0, 0, flat.narrow(0, offset, p.numel())))
                offset += p.numel()
        return Masters(pieces, split)
    raise RuntimeError(f"the module's parameters are {_local(named[0][1]).dtype} but no fp32 "
                       f"master weights were found in DeepSpeed's {type(optimizer).__name__}: "
                       f"this DeepSpeed keeps them where maskdm does not look (pipeline/masters.py)")


@torch.no_grad()
def write(module: torch.nn.Module, optimizer, weights: dict[str, torch.Tensor]) -> int:
    """Set this rank's fp32 masters from whole fp32 ``weights`` (the initial or loaded values
    DeepSpeed only kept rounded); -> the number of elements written (0 for an fp32 run)."""
    found = find(module, optimizer)
    if found is None:
        return 0
    written = 0
    for name, pieces in found.pieces.items():
        flat = weights[name].detach().reshape(-1)
        for piece in pieces:
            n = min(piece.numel, flat.numel() - piece.start)  # ZeRO-3's last partition: padding
            if n > 0:
                piece.master[:n].copy_(flat[piece.start:piece.start + n])
                written += n
    return written
