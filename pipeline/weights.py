"""Loading weights into a model: strict key and shape matching with an error that lists every
mismatch (fine-tuning's ``train.init_from``, sampling, FID)."""

from __future__ import annotations

import torch

from maskdm.model import ModelConfig, build_model


def model_from_weights(mcfg: ModelConfig, weights: dict[str, torch.Tensor], device) -> torch.nn.Module:
    """An eval-mode fp32 model holding ``weights`` (strict key and shape match)."""
    net = build_model(mcfg, device=device)
    load_strict(net, weights, "weights")
    return net.eval()


def load_strict(net: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every mismatch."""
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:6])}{'...' if len(missing) > 6 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:6])}"
                         f"{'...' if len(unexpected) > 6 else ''})")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:6])}")
        raise RuntimeError(f"{where} do not fit this model: {'; '.join(parts)}. The checkpoint "
                           f"was trained with another architecture, image size or data space.")
    net.load_state_dict(weights, strict=True)
