"""The one thing loaders yield."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """x0: [B, C, H, W] in model space on the training device; labels: [B] long or None; keys."""

    x0: torch.Tensor
    labels: torch.Tensor | None
    keys: list[str]
