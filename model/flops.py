"""Analytic FLOP count of a U-ViT training step (multiply-add = 2 FLOPs), for MFU."""

from __future__ import annotations

from .config import ModelConfig


def _block_flops(L: int, D: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block over L tokens of width D: matmuls only."""
    hidden = int(D * mlp_ratio)
    return (2 * L * D * 3 * D      # qkv
            + 2 * L * L * D * 2    # q k^T and attn @ v
            + 2 * L * D * D        # output projection
            + 2 * L * D * hidden * 2)  # MLP


def forward_flops(cfg: ModelConfig, visible_tokens: int | None = None) -> int:
    """FLOPs of one forward pass for one image, counting matmuls only (norms etc. are <1%).
    With a MaskDiT decoder: its input projection, its blocks over every token and the head on
    every token are added."""
    cfg = cfg.resolved()
    S = cfg.num_tokens if visible_tokens is None else visible_tokens
    L = S + cfg.extras
    D = cfg.dim
    blocks = (cfg.depth + 1) * _block_flops(L, D, cfg.mlp_ratio)
    skips = (cfg.depth // 2) * 2 * L * (2 * D) * D
    per_token = cfg.patch_dim // cfg.token_groups  # input values per token (average over groups)
    embed = 2 * S * per_token * D
    head = 2 * S * D * per_token  # on the visible tokens
    if cfg.token_groups > 1 and visible_tokens is not None:
        # split DWT tokens with a mask, as uvit.py computes them: both groups are embedded whole
        # before the visible tokens are kept, and both heads run on every visible token
        embed = 2 * cfg.num_tokens * per_token * D
        head = 2 * S * D * cfg.patch_dim
    if cfg.final_conv and visible_tokens is None:  # the 3x3 conv over the whole image
        H, W = cfg.input_size, cfg.input_width or cfg.input_size
        embed += 2 * 9 * cfg.in_channels * cfg.in_channels * H * W
    if not cfg.decoder_depth:
        return blocks + skips + embed + head
    Dd, N = cfg.decoder_dim, cfg.num_tokens
    decoder = (2 * L * D * Dd  # projection of the encoder's output
               + cfg.decoder_depth * _block_flops(N + cfg.extras, Dd, cfg.mlp_ratio)
               + 2 * N * Dd * per_token)  # head on every token
    return blocks + skips + embed + decoder


def train_step_flops(cfg: ModelConfig, visible_tokens: int | None = None) -> int:
    """Forward + backward (2x forward) per image; activation recomputation not counted."""
    return 3 * forward_flops(cfg, visible_tokens)


def step_flops(cfg: ModelConfig, mask, global_batch: int) -> int:
    """Training FLOPs of one optimizer step: ``global_batch`` images through the encoder on the
    visible tokens of ``mask`` (a ``MaskSpec``; every token when it masks nothing)."""
    cfg = cfg.resolved()
    visible = mask.num_visible(cfg.grid) * cfg.token_groups if mask.is_masked else None
    return train_step_flops(cfg, visible) * global_batch
