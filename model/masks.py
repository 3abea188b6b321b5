"""Mask generators: pure functions of (generator, token grid, spec) -> sorted ``keep_idx``.

Every sample keeps exactly the same number S of tokens, so batches need no padding.
- ``patch(ratio)``: ``round(ratio * N)`` tokens masked uniformly at random.
- ``block(ratio, block_size)``: the grid is tiled by ``block_size`` x ``block_size`` blocks (in
  patches); ``round(ratio * num_blocks)`` whole blocks are masked.
- ``crop(size)``: one random ``size`` x ``size`` window of tokens stays visible.
- ratio 0 (``none``): no mask; ``keep_idx`` is None (fine-tuning).
Everything runs on the generator's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

MaskKind = Literal["none", "patch", "block", "crop"]
KINDS = get_args(MaskKind)


class MaskSpecError(ValueError):
    pass


@dataclass(frozen=True)
class MaskSpec:
    kind: MaskKind = "none"
    ratio: float = 0.0  # patch, block: the fraction of tokens (blocks) hidden
    block_size: int = 1  # block: side of a block, in patches
    crop_size: int = 0  # crop: side of the visible window, in patches

    def validate(self, grid: tuple[int, int] | None = None) -> "MaskSpec":
        """Raise MaskSpecError (naming the field) if this spec is invalid or, given the token
        ``grid``, cannot run on it."""
        if self.kind not in KINDS:
            raise MaskSpecError(f"mask.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in ("patch", "block") and not 0.0 <= self.ratio < 1.0:
            raise MaskSpecError(f"mask.ratio must be in [0, 1), got {self.ratio} "
                                f"(1.0 would leave no visible token)")
        if grid is None:
            return self
        gh, gw = grid
        if self.kind == "block":
            b = self.block_size
            if b < 1 or gh % b or gw % b:
                raise MaskSpecError(f"mask.block_size {b} must divide the token grid {gh}x{gw}")
            nb = (gh // b) * (gw // b)
            if self.num_visible(grid) < 1 or (self.ratio > 0 and round(self.ratio * nb) == 0):
                near = ", ".join(f"{k / nb:.3g}" for k in range(1, nb)) or "none"
                raise MaskSpecError(
                    f"mask.ratio {self.ratio} with block_size {b} masks "
                    f"{'every' if self.num_visible(grid) < 1 else 'no'} block of the {nb} "
                    f"{b}x{b} blocks of the {gh}x{gw} token grid (whole blocks are masked; "
                    f"achievable ratios: {near}); use a smaller block_size or another ratio")
        if self.kind == "crop":
            c = self.crop_size
            if not 1 <= c <= min(gh, gw):
                raise MaskSpecError(f"mask.crop_size {c} must be in 1..{min(gh, gw)} "
                                    f"(the token grid is {gh}x{gw})")
        if self.kind == "patch" and self.num_visible(grid) < 1:
            raise MaskSpecError(f"mask.ratio {self.ratio} leaves no visible token of {gh * gw}")
        return self

    @property
    def is_masked(self) -> bool:
        if self.kind == "crop":
            return True
        return self.kind in ("patch", "block") and self.ratio > 0

    def num_visible(self, grid: tuple[int, int]) -> int:
        gh, gw = grid
        n = gh * gw
        if not self.is_masked:
            return n
        if self.kind == "patch":
            return n - round(self.ratio * n)
        if self.kind == "block":
            nb = (gh // self.block_size) * (gw // self.block_size)
            return (nb - round(self.ratio * nb)) * self.block_size ** 2
        return self.crop_size ** 2

    def effective_ratio(self, grid: tuple[int, int]) -> float:
        return 1.0 - self.num_visible(grid) / (grid[0] * grid[1])

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block(ratio={self.ratio}, block_size={self.block_size})"
        if self.kind == "crop":
            return f"crop(size={self.crop_size})"
        if self.kind == "patch":
            return f"patch(ratio={self.ratio})"
        return "none"


def patch(ratio: float) -> MaskSpec:
    return MaskSpec("patch", ratio=ratio)


def block(ratio: float, block_size: int) -> MaskSpec:
    return MaskSpec("block", ratio=ratio, block_size=block_size)


def crop(size: int) -> MaskSpec:
    return MaskSpec("crop", crop_size=size)


def _random_subset(batch: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, k] sorted indices: a uniformly random k-subset of range(n) per row."""
    scores = torch.rand(batch, n, generator=gen, device=gen.device)
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def sample_keep_idx(spec: MaskSpec, batch: int, grid: tuple[int, int],
                    gen: torch.Generator, groups: int = 1) -> torch.Tensor | None:
    """Visible token indices, LongTensor [batch, S] sorted per row, or None for no mask. With
    ``groups`` > 1 (token groups stacked after one another, e.g. the LL and detail tokens of
    ``dwt_tokens: split``) each group gets its own independent mask of the same spec."""
    if not spec.is_masked:
        return None
    if groups > 1:
        n = grid[0] * grid[1]
        return torch.cat([sample_keep_idx(spec, batch, grid, gen) + k * n for k in range(groups)],
                         dim=1)
    gh, gw = grid
    dev = gen.device
    if spec.kind == "patch":
        return _random_subset(batch, gh * gw, spec.num_visible(grid), gen)
    if spec.kind == "block":
        b = spec.block_size
        bh, bw = gh // b, gw // b
        kb = spec.num_visible(grid) // (b * b)
        blocks = _random_subset(batch, bh * bw, kb, gen)  # [B, kb] visible block ids
        by, bx = blocks // bw, blocks % bw
        dy = torch.arange(b, device=dev).repeat_interleave(b)  # offsets inside a block
        dx = torch.arange(b, device=dev).repeat(b)
        rows = by[:, :, None] * b + dy
        cols = bx[:, :, None] * b + dx
        return (rows * gw + cols).reshape(batch, -1).sort(dim=1).values
    c = spec.crop_size
    top = torch.randint(0, gh - c + 1, (batch, 1), generator=gen, device=dev)
    left = torch.randint(0, gw - c + 1, (batch, 1), generator=gen, device=dev)
    r = torch.arange(c, device=dev)
    idx = (top + r.repeat_interleave(c)[None]) * gw + (left + r.repeat(c)[None])
    return idx  # already sorted: row-major within the window

