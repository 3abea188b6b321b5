"""The MaskDM model: U-ViT on visible tokens, masks, Haar DWT in torch, diffusion and objectives.

Architecture only: nothing here knows about data loading, DeepSpeed or tracking.
"""

from .config import PRESETS, ModelConfig, build_model  # noqa: F401
