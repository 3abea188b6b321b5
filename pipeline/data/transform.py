"""Raw loader output -> model-space tensors on the training device (shared by both backends).

Everything after the read happens here, on the device: float16 DWT coefficients (or decoded uint8
images, whose Haar DWT is computed here) -> model space (``LL/255 - 1``, ``detail/255``), the
per-sample horizontal flip in the DWT domain, and optionally the switch to pixel space.

The LL scaling is a choice with an effect: ours is ``LL/255 - 1`` = the 2x2 block mean mapped to
[-1, 1], the same range as the image in pixel space and as every detail band. The paper's authors
use ``2 * cA - 1`` (cA the Haar approximation of [0, 1] pixels), which spans [-1, 3]: twice our
amplitude, so at every t their LL band has 4x our signal-to-noise ratio (a log-SNR shift of
log 4 for that band). Ours spends relatively more of the schedule on the coarse structure; the
detail bands are scaled identically in both.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from maskdm.model import dwt as tdwt
from maskdm.shardformat.haar import tensor_shape

Space = Literal["dwt", "pixel"]
SPACES = get_args(Space)


def model_input_shape(image_size: int, space: str) -> tuple[int, int, int]:
    """(C, H, W) of one model-space sample of an ``image_size`` image: the stored Haar subbands
    (dwt) or the image (pixel)."""
    return tensor_shape(image_size) if space == "dwt" else (3, image_size, image_size)


def to_model_space(data: torch.Tensor, encoding: str, flips: torch.Tensor | None,
                   space: str, device: torch.device) -> torch.Tensor:
    """data: float16 [B, 12, h, w] (dwt16) or uint8 [B, H, W, 3] (jpeg) -> float32 [B, C, H', W']."""
    data = data.to(device, non_blocking=True)
    if encoding == "dwt16":
        x = tdwt.model_from_coeffs(data)
    else:
        x = tdwt.model_from_image(data.permute(0, 3, 1, 2))
    if flips is not None and bool(flips.any()):  # flips live on the host: no device sync
        idx = flips.nonzero().flatten().to(device, non_blocking=True)
        x.index_copy_(0, idx, tdwt.flip(x.index_select(0, idx)))
    if space == "pixel":
        x = tdwt.idwt(2.0 * x)  # model space is the Haar of the [-1, 1] image with 1/4 scaling
    return x
