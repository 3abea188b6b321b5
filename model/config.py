"""Model configuration and the preset registry (paper, Table 1)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

from .attention import SDPA_KERNELS, SdpaKernel

# name -> (depth, dim, heads). depth counts in + out blocks; a mid block is added (depth/2 each side).
PRESETS: dict[str, tuple[int, int, int]] = {
    "MaskDM-S": (12, 512, 8),
    "MaskDM-B": (12, 768, 12),
    "MaskDM-L": (16, 1024, 16),
    "tiny": (4, 128, 4),  # tests and the CPU demo
    "small-demo": (6, 192, 6),
    "MaskDiT-B": (12, 768, 12),  # MaskDM-B's encoder + the decoder below
}
# name -> (decoder_depth, decoder_dim) of the presets with a MaskDiT decoder. MaskDiT (Zheng et al.)
# pairs DiT-XL (28 blocks, 1152 wide) with 8 decoder blocks 512 wide, ~7% of the encoder's block
# parameters; 4 blocks 384 wide on the 13 blocks of MaskDM-B keep that proportion.
DECODERS: dict[str, tuple[int, int]] = {"MaskDiT-B": (4, 384)}
Attention = Literal["auto", "sdpa", "xformers"]
DwtTokens = Literal["joint", "split"]
ATTENTION_BACKENDS = get_args(Attention)


@dataclass
class ModelConfig:
    preset: str = "MaskDM-B"  # a name in PRESETS, or any name with depth, dim and heads set
    # The input: 12 channels for Haar-DWT input, 3 for pixels; side 128 for the DWT of 256x256
    # images. The training config derives both from data.space and the shards (leave them unset).
    in_channels: int | None = None
    input_size: int | None = None  # height (and width, unless input_width is set)
    input_width: int | None = None  # a non-square input (e.g. a point of the 2-D/3-D toy: 1 x d)
    patch_size: int = 2
    depth: int | None = None  # None: from the preset
    dim: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    num_classes: int = 0  # > 0 adds a label token (conditional model)
    # MaskDiT's asymmetric decoder: decoder_depth blocks, decoder_dim wide (None: the preset's, else
    # 0 blocks / the encoder's width), over every token: the encoder's output at the visible
    # positions and a learned mask token at the masked ones. The predictions then come from the
    # decoder (train.mae_weight adds the reconstruction loss on the masked tokens). 0: no decoder
    # (MaskDM: the U-ViT predicts the visible tokens itself).
    decoder_depth: int | None = None
    decoder_dim: int | None = None
    # Control-metadata conditioning: the horizontal-flip flag of each training image as a token of
    # its own, so the model learns what a flip does and samples with flip = 0 (unflipped).
    flip_condition: bool = False
    # U-ViT's final 3x3 convolution over the predicted image (the U-ViT paper's default; the MaskDM
    # authors' configs leave it off, and so do the paper recipes here): residual and started at
    # zero, it runs wherever the whole image is predicted (DSM, sampling); the masked forward
    # predicts the visible tokens only and skips it, so MSM pre-training leaves it at zero.
    final_conv: bool = False
    # Haar-DWT input (12 channels) only: "joint" embeds all 12 channels of a patch as one token;
    # "split" (the paper's authors' tokenisation) embeds the LL band (3 channels) and the detail
    # bands (9 channels) of a patch as two tokens with their own embeddings and heads: twice the
    # tokens of "joint" at the same patch size, so the authors' 2048 tokens at 256 px are
    # patch_size 4 with "split" (and 4096 tokens are patch_size 2 with "joint"). With a mask, the
    # two groups are masked independently with the same spec, as the authors do.
    dwt_tokens: DwtTokens = "joint"
    attention: Attention = "auto"
    sdpa_kernel: SdpaKernel = "auto"  # with sdpa: auto lets PyTorch pick the kernel
    # Activation checkpointing: False, True (every block) or an int k (the first k blocks run
    # recompute-in-backward; the rest keep activations) to trade memory for speed.
    checkpointing: bool | int = False

    @property
    def checkpoint_blocks(self) -> int:
        total = (self.depth or 0) + 1
        if self.checkpointing is True:
            return total
        if self.checkpointing is False or self.checkpointing is None:
            return 0
        return int(self.checkpointing)

    def architecture(self) -> "ModelConfig":
        """Fill depth/dim/heads from the preset and check everything that does not depend on the
        input (raises ValueError naming the field)."""
        if self.preset not in PRESETS and None in (self.depth, self.dim, self.heads):
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose one of "
                             f"{', '.join(PRESETS)} or set model.depth, model.dim and model.heads")
        d, w, h = PRESETS.get(self.preset, (None, None, None))
        dd, dw = DECODERS.get(self.preset, (0, None))
        cfg = replace(self, depth=self.depth or d, dim=self.dim or w, heads=self.heads or h)
        cfg = replace(cfg, decoder_depth=dd if cfg.decoder_depth is None else cfg.decoder_depth)
        cfg = replace(cfg, decoder_dim=(cfg.decoder_dim or dw or cfg.dim) if cfg.decoder_depth
                      else None)
        if cfg.depth < 2 or cfg.depth % 2:
            raise ValueError(f"model.depth must be an even number >= 2, got {cfg.depth}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})")
        if cfg.sdpa_kernel not in SDPA_KERNELS:
            raise ValueError(f"model.sdpa_kernel must be one of {SDPA_KERNELS}, got "
                             f"{cfg.sdpa_kernel!r}")
        if not isinstance(cfg.checkpointing, bool) and not 0 <= int(cfg.checkpointing) <= cfg.depth + 1:
            raise ValueError(f"model.checkpointing must be true, false or a block count in "
                             f"0..{cfg.depth + 1}, got {cfg.checkpointing}")
        if cfg.decoder_depth < 0:
            raise ValueError(f"model.decoder_depth must be >= 0 (0: no decoder), got "
                             f"{cfg.decoder_depth}")
        if cfg.decoder_depth and cfg.decoder_dim % cfg.head_dim:
            raise ValueError(f"model.decoder_dim ({cfg.decoder_dim}) must be a multiple of the "
                             f"head width model.dim / model.heads ({cfg.head_dim}): the decoder "
                             f"keeps the encoder's head width")
        if cfg.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got "
                             f"{cfg.attention!r}")
        return cfg

    def resolved(self) -> "ModelConfig":
        """``architecture()`` plus the input: everything a model can be built from."""
        if self.in_channels is None or self.input_size is None:
            raise ValueError("model.in_channels and model.input_size must be set (the training "
                             "config derives them from data.space and the shards)")
        cfg = self.architecture()
        for name in ("input_size", "input_width"):
            v = getattr(cfg, name)
            if v is not None and v % cfg.patch_size:
                raise ValueError(f"model.{name} ({v}) must be divisible by model.patch_size "
                                 f"({cfg.patch_size})")
        if cfg.decoder_depth and cfg.dwt_tokens == "split":
            raise ValueError("model.decoder_depth > 0 (MaskDiT decoder) works with one token per "
                             "patch: use model.dwt_tokens: joint, or data.space: pixel")
        if cfg.dwt_tokens == "split" and cfg.in_channels != 12:
            raise ValueError(f"model.dwt_tokens: split needs the 12-channel Haar-DWT input "
                             f"(data.space: dwt), got {cfg.in_channels} channels")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def decoder_heads(self) -> int:
        """The decoder's heads: its width over the encoder's head width."""
        return (self.decoder_dim or 0) // self.head_dim

    @property
    def grid(self) -> tuple[int, int]:
        p = self.patch_size
        return (self.input_size // p, (self.input_width or self.input_size) // p)

    @property
    def token_groups(self) -> int:
        """Tokens per grid cell: 2 with dwt_tokens split (LL, details), else 1."""
        return 2 if self.dwt_tokens == "split" else 1

    @property
    def num_tokens(self) -> int:
        return self.token_groups * self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        """Input values of one patch over all channels (all token groups together)."""
        return self.in_channels * self.patch_size ** 2

    @property
    def group_channels(self) -> tuple[int, ...]:
        """Channels of each token group: (C,) joint, (3, 9) split."""
        return (3, 9) if self.dwt_tokens == "split" else (self.in_channels,)

    @property
    def token_dim(self) -> int:
        """Values per token in the masked output (the largest group; smaller ones zero-padded)."""
        return max(self.group_channels) * self.patch_size ** 2

    @property
    def extras(self) -> int:
        """Tokens before the patches: the time token, a label token if conditional, a flip token
        with flip_condition."""
        return 1 + (1 if self.num_classes > 0 else 0) + (1 if self.flip_condition else 0)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def build_model(cfg: ModelConfig, device=None):
    """ModelConfig -> UViT (attention backend resolved for ``device``)."""
    from .uvit import UViT
    return UViT(cfg.resolved(), device=device)
