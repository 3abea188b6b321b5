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


def load_strict(net: torch.nn.Module, weights: dict[str, torch.Tensor], where: str,
                fresh: frozenset[str] | set[str] = frozenset()) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every mismatch; the keys in
    ``fresh`` keep the model's own initial values (``transfer_weights``)."""
    own = net.state_dict()
    weights = {**{k: own[k] for k in fresh if k in own}, **weights}
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
# embedding is interpolated), the decoder (dropped, see transfer_weights) and settings that hold no
# weights.
TRANSFERABLE = ("input_size", "input_width", "attention", "sdpa_kernel", "checkpointing")
DECODER_KEYS = ("decoder_embed.", "mask_token", "decoder_pos", "decoder_blocks.", "decoder_norm.")


def transfer_weights(weights: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig,
                     where: str) -> tuple[dict[str, torch.Tensor], list[str], set[str]]:
    """Weights of a checkpoint's model ``src`` -> weights for ``dst``, -> (weights, notes saying
    what was changed, the keys that start from ``dst``'s own initialisation). Two differences
    transfer:

    - the image size (resolution transfer): the positional embeddings are interpolated to
      ``dst``'s token grid (``model.uvit.resize_pos_embed``);
    - a MaskDiT decoder in ``src`` and none in ``dst``: the decoder is dropped and the head, which
      read the decoder, starts fresh on the encoder's output.

    Anything else that differs is refused, naming the fields."""
    from dataclasses import asdict

    from maskdm.model.uvit import resize_pos_embed
    a, b = asdict(src.architecture()), asdict(dst.architecture())
    drop_decoder = bool(a["decoder_depth"]) and not b["decoder_depth"]
    skip = TRANSFERABLE + (("decoder_depth", "decoder_dim") if drop_decoder else ())
    differ = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in skip and a[k] != b[k]]
    if differ:
        raise RuntimeError(f"{where} cannot initialise this model: {'; '.join(differ)} (only the "
                           f"image size may change, the positional embedding is then "
                           f"interpolated, or a MaskDiT decoder be dropped with "
                           f"model.decoder_depth=0)")
    out, notes, fresh = dict(weights), [], set()
    if drop_decoder:
        for k in [k for k in out if k.startswith(DECODER_KEYS)]:
            del out[k]
        fresh = {k for k in out if k.startswith("head.")}
        for k in fresh:
            del out[k]
        notes.append(f"{where}: its MaskDiT decoder ({a['decoder_depth']} blocks) is dropped "
                     f"(model.decoder_depth=0); the output head starts fresh on the encoder")
    if src.grid != dst.grid and "pos_embed" in weights:
        out["pos_embed"] = resize_pos_embed(weights["pos_embed"], dst.extras, dst.token_groups,
                                            src.grid, dst.grid)
        if "decoder_pos" in out:  # the MaskDiT decoder's own embedding: one token group
            out["decoder_pos"] = resize_pos_embed(weights["decoder_pos"], dst.extras, 1,
                                                  src.grid, dst.grid)
        (h, w), (nh, nw) = src.grid, dst.grid
        notes.append(f"{where}: trained on {h}x{w} tokens, this model has {nh}x{nw}: positional "
                     f"embedding{'s' if 'decoder_pos' in out else ''} interpolated (bicubic), "
                     f"every other weight loaded as is")
    return out, notes, fresh
