"""Raw loader output -> model-space tensors (shared by both backends).

Everything after the read happens here: float16 DWT coefficients (or decoded uint8 images, whose
Haar DWT is computed here) -> model space (``LL/255 - 1``, ``detail/255``), the per-sample
horizontal flip in the DWT domain, and optionally the switch to pixel space (decoded JPEG pixels go
to [-1, 1] directly and are flipped as pixels: no detour through the Haar). For a GPU the whole
batch goes through ``to_model_space`` on the device; when training on the CPU the torch backend's
workers convert each sample as they read it (``sample_to_model_space``: the same arithmetic, so
the same values to the bit, done in parallel and while the sample is still in the CPU's cache).

The LL scaling is a choice with an effect: ours is ``LL/255 - 1`` = the 2x2 block mean mapped to
[-1, 1], the same range as the image in pixel space and as every detail band. The paper's authors
use ``2 * cA - 1`` (cA the Haar approximation of [0, 1] pixels), which spans [-1, 3]: twice our
amplitude, so at every t their LL band has 4x our signal-to-noise ratio (a log-SNR shift of
log 4 for that band). Ours spends relatively more of the schedule on the coarse structure; the
detail bands are scaled identically in both.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
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
    """data: float16 [B, 12, h, w] (dwt16) or uint8 [B, H, W, 3] (jpeg) -> float32 [B, C, H', W'].

    Stored coefficients are flipped in the DWT domain; decoded images are flipped as pixels,
    before their Haar (cheaper, and the same values)."""
    data = data.to(device, non_blocking=True)
    idx = None
    if flips is not None and bool(flips.any()):  # flips live on the host: no device sync
        idx = flips.nonzero().flatten().to(device, non_blocking=True)
    if encoding == "dwt16":
        x = tdwt.model_from_coeffs(data)
        if idx is not None:
            x.index_copy_(0, idx, tdwt.flip(x.index_select(0, idx)))
        # model space is the Haar of the [-1, 1] image with 1/4 scaling
        return tdwt.idwt(2.0 * x) if space == "pixel" else x
    img = data.permute(0, 3, 1, 2)
    if idx is not None:
        img = img.clone()  # never write into the loader's buffer
        img.index_copy_(0, idx, img.index_select(0, idx).flip(-1))
    return _from_image(img, space)


def _from_image(img: torch.Tensor, space: str) -> torch.Tensor:
    # decoded pixels go to [-1, 1] directly: no detour through the Haar
    return tdwt.pixels_from_image(img) if space == "pixel" else tdwt.model_from_image(img)


def sample_to_model_space(data, encoding: str, flip: bool, space: str,
                          out: torch.Tensor) -> None:
    """One sample into ``out`` (float32 [C, H', W']): ``to_model_space`` of a batch of one, the
    same arithmetic on every value (a flip only moves values and changes signs), so the values
    are bit-identical to the batched path (``tests/test_loader.py`` checks it).
    ``data``: float16 [12, h, w] (dwt16) or uint8 [H, W, 3] (jpeg), a numpy array or tensor."""
    if isinstance(data, np.ndarray) and not data.flags.writeable:
        data = data.copy()  # a decoder's read-only array (torch warns on those); ~20 us
    d = torch.as_tensor(data)[None]
    if encoding == "dwt16" and space == "dwt":
        # into ``out`` with no temporary: the mirror first, then flip's sign change on V and D
        # (tdwt.FLIP_SIGN; x * -1 == -x, to the bit)
        tdwt.model_from_coeffs(d[0].flip(-1) if flip else d[0], out=out)
        if flip:
            out[6:].neg_()
        return
    if encoding == "dwt16":
        x = tdwt.model_from_coeffs(d)
        if flip:
            x = tdwt.flip(x)
        if space == "pixel":
            x = tdwt.idwt(2.0 * x)
    else:
        img = d.permute(0, 3, 1, 2)
        x = _from_image(img.flip(-1) if flip else img, space)
    out.copy_(x[0])
