"""The one thing loaders yield."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """x0: [B, C, H, W] in model space on the training device; labels: [B] long or None; keys;
    flips: [B] bool on the training device, True where the sample was flipped horizontally (None
    when data.hflip is off): the flip conditioning of ``model.flip_condition``."""

    x0: torch.Tensor
    labels: torch.Tensor | None
    keys: list[str]
    flips: torch.Tensor | None = None
