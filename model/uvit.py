"""U-ViT that runs its encoder on the visible tokens only, with an optional MaskDiT decoder.

Tokens: ``[time, (label), (flip), patch_1 .. patch_S]``. Blocks: depth/2 in-blocks, one mid block,
depth/2 out-blocks, each out-block first merging its long skip with ``Linear(concat(x, skip))``. A
final LayerNorm and one linear head map each patch token back to ``C * p * p`` values. With
``keep_idx`` the masked patches are dropped before the first block, so their content never reaches
the output and the cost scales with the number of visible tokens.

With ``decoder_depth`` > 0 (MaskDiT's asymmetric decoder) the encoder's output is projected to the
decoder's width, a learned mask token fills every masked position, the decoder's own positional
embedding is added and ``decoder_depth`` plain blocks run over all tokens; the head reads the
decoder, so a masked forward pass predicts every token (visible and masked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, resolve_backend
from .config import ModelConfig


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], tokens in row-major grid order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, C*p*p] -> [B, C, H, W] (inverse of ``patchify``)."""
    B = tokens.shape[0]
    gh, gw = grid
    x = tokens.reshape(B, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, gh * p, gw * p)


def group_tokens(x: torch.Tensor, p: int, group_channels: tuple[int, ...]) -> torch.Tensor:
    """[B, C, H, W] -> [B, G*N, P]: the tokens of each channel group (consecutive channels), one
    group after the other, each zero-padded to the largest group's ``c*p*p`` values."""
    width = max(group_channels) * p * p
    parts, lo = [], 0
    for c in group_channels:
        t = patchify(x[:, lo:lo + c], p)
        parts.append(F.pad(t, (0, width - t.shape[-1])))
        lo += c
    return torch.cat(parts, dim=1)


def token_valid(grid_side: int, p: int, group_channels: tuple[int, ...],
                device=None) -> torch.Tensor:
    """[1, G*N, P] float mask of the real (not padding) values of ``group_tokens``."""
    width = max(group_channels) * p * p
    n = grid_side * grid_side
    rows = [torch.arange(width, device=device) < c * p * p for c in group_channels]
    return torch.cat([r.expand(n, width) for r in rows]).float().unsqueeze(0)


def gather_tokens(tokens: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """[B, N, K] gathered at keep_idx [B, S] -> [B, S, K]."""
    return torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """[gh*gw, dim] fixed 2-D sine-cosine position codes (half the channels per axis)."""
    gh, gw = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                            torch.arange(gw, dtype=torch.float64), indexing="ij")
    out = []
    for pos in (ys.flatten(), xs.flatten()):
        args = pos[:, None] * omega[None]
        out += [torch.sin(args), torch.cos(args)]
    emb = torch.cat(out, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with ``skip`` it first merges the U-Net long skip."""

    def __init__(self, cfg: ModelConfig, backend: str, skip: bool, dim: int | None = None,
                 heads: int | None = None):
        """``dim``/``heads``: the decoder's (default: the encoder's)."""
        super().__init__()
        dim, heads = dim or cfg.dim, heads or cfg.heads
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, cfg.qkv_bias, backend, cfg.sdpa_kernel)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self._ckpt = cfg.checkpoint_blocks
        self.attention_backend, self.attention_reason = resolve_backend(cfg.attention, device)
        D = cfg.dim
        p2 = cfg.patch_size ** 2
        first = cfg.group_channels[0] * p2  # all channels (joint) or the LL band (split)
        self.patch_embed = nn.Linear(first, D)
        self.split = cfg.token_groups > 1
        if self.split:  # dwt_tokens split: the 9 detail channels get their own embedding and head
            self.detail_embed = nn.Linear(cfg.group_channels[1] * p2, D)
        self.label_embed = nn.Embedding(cfg.num_classes, D) if cfg.num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.extras + cfg.num_tokens, D))
        half = cfg.depth // 2
        self.in_blocks = nn.ModuleList(Block(cfg, self.attention_backend, False) for _ in range(half))
        self.mid_block = Block(cfg, self.attention_backend, False)
        self.out_blocks = nn.ModuleList(Block(cfg, self.attention_backend, True) for _ in range(half))
        self.flip_embed = nn.Embedding(2, D) if cfg.flip_condition else None
        self.norm = nn.LayerNorm(D)
        out_dim = D
        if cfg.decoder_depth:  # MaskDiT's decoder; the head reads its output
            Dd = out_dim = cfg.decoder_dim
            self.decoder_embed = nn.Linear(D, Dd)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
            self.decoder_pos = nn.Parameter(torch.zeros(1, cfg.extras + cfg.num_tokens, Dd))
            self.decoder_blocks = nn.ModuleList(
                Block(cfg, self.attention_backend, False, Dd, cfg.decoder_heads)
                for _ in range(cfg.decoder_depth))
            self.decoder_norm = nn.LayerNorm(Dd)
        self.head = nn.Linear(out_dim, first)
        if self.split:
            self.detail_head = nn.Linear(D, cfg.group_channels[1] * p2)
        self.final_conv = nn.Conv2d(cfg.in_channels, cfg.in_channels, 3, padding=1) \
            if cfg.final_conv else None
        self.apply(self._init)
        if self.final_conv is not None:  # residual from zero: the identity until trained
            nn.init.zeros_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)
        # Learned, but started from 2-D sine-cosine codes: tokens know where they are from step
        # one, which a 0.02-std random start takes many thousands of steps to learn.
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            self.pos_embed[0, cfg.extras:] = sincos_2d(D, cfg.grid).repeat(cfg.token_groups, 1)
            if cfg.decoder_depth:
                nn.init.trunc_normal_(self.decoder_pos, std=0.02)
                self.decoder_pos[0, cfg.extras:] = sincos_2d(cfg.decoder_dim, cfg.grid)
                nn.init.normal_(self.mask_token, std=0.02)
        if device is not None:
            self.to(device)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)

    def set_attention_backend(self, name: str) -> str:
        """Switch every layer to ``name`` (resolved for the current device); returns it."""
        backend, why = resolve_backend(name, self.pos_embed.device)
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
        self.attention_backend, self.attention_reason = backend, why
        return backend

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: biases, norms, embeddings."""
        names = set()
        for n, p in self.named_parameters():
            if p.ndim < 2 or n.startswith(("pos_embed", "label_embed", "flip_embed",
                                           "decoder_pos", "mask_token")):
                names.add(n)
        return names

    def _run(self, i: int, block: Block, x, skip=None):
        if i < self._ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, keep_idx: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                flips: torch.Tensor | None = None) -> torch.Tensor:
        """x_t [B, C, H, W], t [B] -> eps prediction: [B, C, H, W] without keep_idx; with keep_idx
        [B, S] the visible tokens' [B, S, C*p*p], or with a decoder every token's [B, N, C*p*p].
        ``flips`` [B] (flip_condition only): 1 where the image was flipped; None means 0."""
        cfg = self.cfg
        p = cfg.patch_size
        pos = self.pos_embed[:, cfg.extras:].expand(x_t.shape[0], -1, -1)
        if self.split:  # embed both groups, then keep the visible tokens (embedding is cheap)
            c = cfg.group_channels[0]
            emb = torch.cat([self.patch_embed(patchify(x_t[:, :c], p)),
                             self.detail_embed(patchify(x_t[:, c:], p))], dim=1)
            if keep_idx is not None:
                emb, pos = gather_tokens(emb, keep_idx), gather_tokens(pos, keep_idx)
            tokens = emb + pos
        else:
            patches = patchify(x_t, p)  # [B, N, C*p*p]
            if keep_idx is not None:
                patches = gather_tokens(patches, keep_idx)
                pos = gather_tokens(pos, keep_idx)
            tokens = self.patch_embed(patches) + pos
        extra = [timestep_embedding(t, cfg.dim).to(tokens.dtype).unsqueeze(1)]
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("this model is conditional (model.num_classes > 0): pass labels")
            extra.append(self.label_embed(labels).unsqueeze(1))
        if self.flip_embed is not None:
            f = torch.zeros(len(t), dtype=torch.long, device=t.device) if flips is None \
                else flips.to(device=t.device, dtype=torch.long)
            extra.append(self.flip_embed(f).unsqueeze(1))
        extra = torch.cat(extra, dim=1) + self.pos_embed[:, :cfg.extras]
        x = torch.cat([extra.to(tokens.dtype), tokens], dim=1)

        skips = []
        for i, blk in enumerate(self.in_blocks):
            x = self._run(i, blk, x)
            skips.append(x)
        half = len(self.in_blocks)
        x = self._run(half, self.mid_block, x)
        for i, blk in enumerate(self.out_blocks):
            x = self._run(half + 1 + i, blk, x, skips.pop())
        if cfg.decoder_depth:
            return self._decode(self.norm(x), keep_idx)
        x = self.norm(x[:, cfg.extras:])
        if self.split:
            out = self._split_head(x, keep_idx)
            return out if keep_idx is not None else self._conv(out)
        out = self.head(x)
        if keep_idx is not None:
            return out
        return self._conv(unpatchify(out, p, cfg.in_channels, cfg.grid))

    def _conv(self, img: torch.Tensor) -> torch.Tensor:
        """The final 3x3 convolution (``final_conv``) over a whole predicted image [B, C, H, W]."""
        return img if self.final_conv is None else img + self.final_conv(img)

    def _decode(self, x: torch.Tensor, keep_idx: torch.Tensor | None) -> torch.Tensor:
        """Encoder output [B, E+S, D] -> the decoder's prediction of every token: [B, N, K] with
        keep_idx (mask tokens at the masked positions), else [B, C, H, W]."""
        cfg = self.cfg
        E = cfg.extras
        y = self.decoder_embed(x)
        extra, tokens = y[:, :E], y[:, E:]
        if keep_idx is not None:
            full = self.mask_token.to(y.dtype).expand(len(y), cfg.num_tokens, -1)
            tokens = full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), tokens)
        y = torch.cat([extra, tokens], dim=1) + self.decoder_pos.to(y.dtype)
        for blk in self.decoder_blocks:
            y = blk(y)
        out = self.head(self.decoder_norm(y[:, E:]))
        if keep_idx is not None:
            return out
        return self._conv(unpatchify(out, cfg.patch_size, cfg.in_channels, cfg.grid))

    def _split_head(self, x: torch.Tensor, keep_idx: torch.Tensor | None) -> torch.Tensor:
        """LL tokens through ``head``, detail tokens through ``detail_head``: [B, C, H, W], or
        with ``keep_idx`` [B, S, 9*p*p] with the LL tokens zero-padded (``group_tokens``)."""
        cfg, p = self.cfg, self.cfg.patch_size
        n = cfg.grid[0] * cfg.grid[1]
        c_ll, c_det = cfg.group_channels
        if keep_idx is None:
            ll = unpatchify(self.head(x[:, :n]), p, c_ll, cfg.grid)
            det = unpatchify(self.detail_head(x[:, n:]), p, c_det, cfg.grid)
            return torch.cat([ll, det], dim=1)
        ll = F.pad(self.head(x), (0, (c_det - c_ll) * p * p))
        return torch.where((keep_idx < n).unsqueeze(-1), ll, self.detail_head(x))


def resize_pos_embed(pos: torch.Tensor, extras: int, groups: int, old: tuple[int, int],
                     new: tuple[int, int]) -> torch.Tensor:
    """Positional embeddings ``[1, extras + groups*h*w, D]`` on grid ``old`` -> the same on grid
    ``new``: the extra tokens (time, label) are kept as they are, and each token group's 2-D grid
    is resized bicubically (``align_corners=False``) on its own. The identity when the grids match
    (resolution transfer: pre-train at a low resolution, fine-tune at a higher one)."""
    if tuple(old) == tuple(new):
        return pos
    dim = pos.shape[-1]
    (h, w), (nh, nw) = old, new
    if pos.shape[1] != extras + groups * h * w:
        raise ValueError(f"pos_embed has {pos.shape[1]} tokens, not {extras} + {groups} x {h}x{w}")
    grids = pos[0, extras:].reshape(groups, h, w, dim).permute(0, 3, 1, 2).float()
    out = F.interpolate(grids, size=(nh, nw), mode="bicubic", align_corners=False)
    out = out.permute(0, 2, 3, 1).reshape(1, groups * nh * nw, dim).to(pos.dtype)
    return torch.cat([pos[:, :extras], out], dim=1)
