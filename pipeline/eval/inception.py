"""The Inception-v3 network used for FID, with the layer names of the standard FID weights.

Published FIDs are computed with the TensorFlow Inception graph of 2015-12-05; pytorch-fid ported
it to PyTorch as ``pt_inception-2015-12-05-6726825d.pth``. Loading that file here gives the same
2048-d pool features, so our FIDs are comparable with pytorch-fid's (torch-fidelity resizes
differently and can differ in the second decimal). The FID graph differs from torchvision's
Inception in two places: its average pools ignore padding, and the last block max-pools.

Nothing is downloaded: the weights come from ``--inception-weights`` or the torch hub cache, and
when they are missing :class:`MissingWeights` says which file is needed and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskdm.shardformat.fsutil import sha256_file

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
STANDARD_ID = "inception-2015-12-05"
FEATURE_DIM = 2048


class MissingWeights(FileNotFoundError):
    pass


class Conv(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; named ``conv``/``bn`` as in the weights."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TensorFlow's average pool: padded zeros are not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35 grid
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class ReduceB(nn.Module):  # 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # 17x17 grid, factorised 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, **col)
        self.branch7x7dbl_3 = Conv(c7, c7, **row)
        self.branch7x7dbl_4 = Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class ReduceD(nn.Module):  # 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # 8x8 grid, expanded filter banks
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """uint8 images [B, H, W, 3] or [B, 3, H, W] floats in [0, 1] -> pool features [B, 2048]."""

    feature_dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = ReduceB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = ReduceD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the classifier is in the weights file; unused for FID

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def default_locations() -> list[Path]:
    """Where the weights are looked for when no path is given (first hit wins)."""
    places = []
    if os.environ.get("MASKDM_INCEPTION_WEIGHTS"):
        places.append(Path(os.environ["MASKDM_INCEPTION_WEIGHTS"]))
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE)
    return places


def missing_message(tried: list[Path]) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"the FID Inception weights were not found (looked at: "
            f"{', '.join(str(p) for p in tried)}). FID needs the file {WEIGHTS_FILE} "
            f"(95 MB, sha256 starting with {WEIGHTS_SHA256_PREFIX}), the standard weights of "
            f"pytorch-fid. Download it once, on a machine with network access, from "
            f"{WEIGHTS_URL} and either put it in {cache}/ (the torch hub cache, shared with "
            f"pytorch-fid) or pass its path with --inception-weights (config: "
            f"eval.inception_weights; environment: MASKDM_INCEPTION_WEIGHTS). Nothing is "
            f"downloaded during a run.")


def find_weights(path: str | os.PathLike | None = None) -> Path:
    tried = [Path(path).expanduser()] if path else default_locations()
    for p in tried:
        if p.is_file():
            return p
    raise MissingWeights(missing_message(tried))


def load_inception(path: str | os.PathLike | None = None, device="cpu") -> tuple[FIDInception, str]:
    """-> (eval-mode network, feature id). The id is ``inception-2015-12-05`` for the standard
    weights and ``inception-custom-<sha256[:12]>`` for any other file of the same layout, so
    statistics from different networks are never compared with each other."""
    p = find_weights(path)
    digest = sha256_file(p)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MissingWeights(f"{p} is not a readable PyTorch weights file ({e}); "
                             + missing_message([p])) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = FIDInception()
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise MissingWeights(
            f"{p} does not hold FID Inception weights ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrongly shaped tensors, e.g. "
            f"{(missing + unexpected + wrong)[:3]}). " + missing_message([p]))
    net.load_state_dict(state, strict=False)
    feature_id = STANDARD_ID if digest.startswith(WEIGHTS_SHA256_PREFIX) else \
        f"inception-custom-{digest[:12]}"
    return net.eval().to(device), feature_id
