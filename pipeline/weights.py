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


# What may differ between a checkpoint and the model it initialises: the input size (the positional
# embedding is interpolated) and settings that hold no weights.
TRANSFERABLE = ("input_size", "input_width", "attention", "sdpa_kernel", "checkpointing")


def transfer_resolution(weights: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig,
                        where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Weights of a model trained at another image size -> weights for ``dst``, with the positional
    embedding interpolated to ``dst``'s token grid (``model.uvit.resize_pos_embed``); -> (weights,
    a note saying what was interpolated, or None when nothing was). Anything else that differs is
    refused, naming the fields."""
    from dataclasses import asdict

    from maskdm.model.uvit import resize_pos_embed
    a, b = asdict(src.architecture()), asdict(dst.architecture())
    differ = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in TRANSFERABLE and a[k] != b[k]]
    if differ:
        raise RuntimeError(f"{where} cannot initialise this model: {'; '.join(differ)} (only the "
                           f"image size may change; the positional embedding is then "
                           f"interpolated)")
    if src.grid == dst.grid or "pos_embed" not in weights:
        return weights, None
    out = dict(weights)
    out["pos_embed"] = resize_pos_embed(weights["pos_embed"], dst.extras, dst.token_groups,
                                        src.grid, dst.grid)
    (h, w), (nh, nw) = src.grid, dst.grid
    return out, (f"{where}: trained on {h}x{w} tokens, this model has {nh}x{nw}: positional "
                 f"embedding interpolated (bicubic), every other weight loaded as is")
