"""Model invariants: masked forward touches only visible tokens; presets; attention backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskdm.model import ModelConfig, build_model
from maskdm.model.masks import block, patch, sample_keep_idx
from maskdm.model.uvit import gather_tokens, patchify, unpatchify


def _tiny(**kw) -> torch.nn.Module:
    cfg = dict(preset="tiny", in_channels=12, input_size=8, patch_size=2, attention="sdpa")
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**cfg)).eval()


def test_patchify_roundtrip():
    x = torch.randn(2, 12, 8, 8)
    tok = patchify(x, 2)
    assert tok.shape == (2, 16, 48)
    assert torch.equal(unpatchify(tok, 2, 12, (4, 4)), x)
    assert torch.equal(tok[:, 5], x[:, :, 2:4, 2:4].reshape(2, 48))  # token 5 = grid (1, 1)


def test_masked_forward_ignores_masked_inputs():
    net = _tiny()
    x = torch.randn(3, 12, 8, 8)
    t = torch.tensor([5, 500, 999])
    g = torch.Generator().manual_seed(1)
    keep = sample_keep_idx(patch(0.5), 3, (4, 4), g)
    out = net(x, t, keep)
    assert out.shape == (3, 8, 48)
    # overwrite every masked patch with garbage: visible predictions must not change at all
    tok = patchify(x, 2).clone()
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    tok[mask] = torch.randn(int(mask.sum()), 48) * 100
    out2 = net(unpatchify(tok, 2, 12, (4, 4)), t, keep)
    assert torch.equal(out, out2)


def test_full_keep_idx_equals_unmasked_forward():
    net = _tiny()
    x = torch.randn(2, 12, 8, 8)
    t = torch.tensor([10, 700])
    full = net(x, t)
    keep = torch.arange(16).expand(2, -1)
    masked = net(x, t, keep)
    assert torch.allclose(patchify(full, 2), masked, atol=1e-6)


def test_masked_output_matches_visible_positions_not_others():
    """Predictions are tied to their own positions: a different mask gives different outputs."""
    net = _tiny()
    x = torch.randn(1, 12, 8, 8)
    t = torch.tensor([100])
    a = net(x, t, torch.tensor([[0, 1, 2, 3]]))
    b = net(x, t, torch.tensor([[0, 1, 2, 4]]))
    assert not torch.allclose(a, b)


def test_conditional_model_needs_labels():
    net = _tiny(num_classes=5)
    x = torch.randn(2, 12, 8, 8)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="conditional"):
        net(x, t)
    y0 = net(x, t, None, torch.tensor([0, 0]))
    y1 = net(x, t, None, torch.tensor([3, 3]))
    assert not torch.allclose(y0, y1)


def test_checkpointing_gives_same_gradients():
    x = torch.randn(2, 12, 8, 8)
    t = torch.tensor([3, 300])
    grads = []
    for ckpt in (False, True, 2):
        net = _tiny(checkpointing=ckpt).train()
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[2], atol=1e-6)


def test_auto_attention_reports_its_choice_on_cpu():
    net = _tiny(attention="auto")
    assert net.attention_backend == "sdpa"
    assert "cpu" in net.attention_reason


@pytest.mark.parametrize("preset,kw,expected", [
    ("MaskDM-S", dict(in_channels=3, input_size=64, patch_size=4), 44e6),  # CelebA 64x64
    ("MaskDM-B", dict(in_channels=12, input_size=128, patch_size=2), 102e6),  # 256 DWT
    ("MaskDM-L", dict(in_channels=12, input_size=128, patch_size=2), 233e6),
    ("MaskDM-B", dict(in_channels=3, input_size=256, patch_size=4), 102e6),  # 256 pixels
])
def test_preset_parameter_counts(preset, kw, expected):
    with torch.device("meta"):
        net = build_model(ModelConfig(preset=preset, attention="sdpa", **kw))
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - expected) / expected < 0.05, f"{preset}: {n / 1e6:.1f}M"


def test_weight_decay_exclusions():
    net = _tiny(num_classes=3)
    names = net.no_weight_decay()
    assert "pos_embed" in names and "label_embed.weight" in names
    assert "in_blocks.0.norm1.weight" in names and "head.bias" in names
    assert "in_blocks.0.attn.qkv.weight" not in names and "head.weight" not in names


def test_bad_model_configs_are_rejected():
    io = dict(in_channels=12, input_size=8)
    with pytest.raises(ValueError, match="divisible by model.heads"):
        ModelConfig(preset="tiny", dim=130, **io).resolved()
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig(preset="MaskDM-XXL", **io).resolved()
    with pytest.raises(ValueError, match="model.attention"):
        ModelConfig(preset="tiny", attention="flash", **io).resolved()
    with pytest.raises(ValueError, match="input_size must be set"):
        ModelConfig(preset="tiny").resolved()
    with pytest.raises(RuntimeError, match="xformers"):
        build_model(ModelConfig(preset="tiny", attention="xformers", **io), device="cpu")


def test_gather_tokens():
    x = torch.arange(24.).view(1, 6, 4)
    assert torch.equal(gather_tokens(x, torch.tensor([[1, 4]])), x[:, [1, 4]])


def test_block_mask_forward_shapes():
    net = _tiny(input_size=16)
    g = torch.Generator().manual_seed(0)
    keep = sample_keep_idx(block(0.5, 2), 4, (8, 8), g)
    out = net(torch.randn(4, 12, 16, 16), torch.randint(0, 1000, (4,)), keep)
    assert out.shape == (4, 32, 48)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_xformers_and_sdpa_agree_on_gpu():
    pytest.importorskip("xformers")
    torch.manual_seed(0)
    cfg = ModelConfig(preset="MaskDM-S", in_channels=12, input_size=32, patch_size=2,
                      attention="sdpa", depth=4)
    net = build_model(cfg, device="cuda").eval()
    x = torch.randn(4, 12, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    keep = sample_keep_idx(patch(0.7), 4, cfg.grid, torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = [net(x, t, keep).float(), net(x, t).float()]
        net.set_attention_backend("xformers")
        got = [net(x, t, keep).float(), net(x, t).float()]
    for r, g in zip(ref, got):
        rel = (g - r).norm() / r.norm()
        assert rel < 2e-2, f"relative difference {rel:.2e}"


@requires_cuda
def test_bf16_forward_close_to_fp32_on_gpu():
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="tiny", in_channels=12, input_size=32, attention="sdpa"), device="cuda")
    x = torch.randn(2, 12, 32, 32, device="cuda")
    t = torch.tensor([10, 900], device="cuda")
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = net(x, t).float()
    assert (low - ref).norm() / ref.norm() < 2e-2


def test_long_skips_connect_mirrored_blocks():
    """U-ViT: out-block i merges the output of in-block depth/2 - 1 - i (the innermost first)."""
    net = _tiny(preset="MaskDM-S", depth=6, dim=32, heads=2)
    outs, skips = [], []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in net.in_blocks]
    hooks += [b.register_forward_pre_hook(lambda m, a: skips.append(a[1]))
              for b in net.out_blocks]
    with torch.no_grad():
        net(torch.randn(2, 12, 8, 8), torch.tensor([3, 700]))
    for h in hooks:
        h.remove()
    assert len(outs) == len(skips) == 3
    for i, s in enumerate(skips):
        assert s is outs[len(outs) - 1 - i]


def test_timestep_embedding_values():
    """[cos(t f_j), sin(t f_j)] with f_j = 10000^(-j/half): pinned, so a lost half shows."""
    import math

    from maskdm.model.uvit import timestep_embedding
    t = torch.tensor([0.0, 3.0, 250.0])
    emb = timestep_embedding(t, 8)
    f = torch.tensor([math.exp(-math.log(10000.0) * j / 4) for j in range(4)])
    want = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=1)
    assert torch.allclose(emb, want, atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def _split(**kw) -> torch.nn.Module:
    return _tiny(input_size=16, patch_size=4, dwt_tokens="split", **kw)


def test_split_dwt_tokens_layout_and_masked_forward():
    """dwt_tokens split (the authors' layout): LL and detail bands of a patch are two tokens with
    their own embeddings and heads; the masked output is the full output's tokens, LL zero-padded."""
    from maskdm.model.uvit import group_tokens
    net = _split()
    cfg = net.cfg
    assert (cfg.num_tokens, cfg.token_dim, cfg.grid) == (32, 144, (4, 4))
    assert net.patch_embed.in_features == 48 and net.detail_embed.in_features == 144
    x, t = torch.randn(2, 12, 16, 16), torch.tensor([5, 600])
    with torch.no_grad():
        full = net(x, t)
        every = net(x, t, torch.arange(32).expand(2, -1))
    assert full.shape == (2, 12, 16, 16)
    assert torch.allclose(every, group_tokens(full, 4, (3, 9)), atol=1e-5)
    assert torch.equal(every[:, :16, 48:], torch.zeros(2, 16, 96))  # LL padding
    keep = sample_keep_idx(block(0.5, 2), 2, cfg.grid, torch.Generator().manual_seed(1), groups=2)
    assert keep.shape == (2, 16) and (keep[:, :8] < 16).all() and (keep[:, 8:] >= 16).all()
    with torch.no_grad():
        out = net(x, t, keep)
        x2 = x.clone()
        for b in range(2):  # change the LL band where LL tokens are hidden, details where hidden
            for tok in set(range(32)) - set(keep[b].tolist()):
                r, c = divmod(tok % 16, 4)
                ch = slice(0, 3) if tok < 16 else slice(3, 12)
                x2[b, ch, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 5.0
        out2 = net(x2, t, keep)
    assert torch.allclose(out, out2, atol=1e-6)


def test_split_msm_loss_averages_only_real_values():
    from maskdm.model.diffusion import GaussianDiffusion
    from maskdm.model.objective import DiffusionObjective
    from maskdm.model.uvit import gather_tokens, group_tokens, token_valid
    d = GaussianDiffusion("cosine", 1000)
    obj = DiffusionObjective(d, 4, (3, 9))
    noise, t = torch.randn(2, 12, 16, 16), torch.tensor([3, 700])
    keep = torch.tensor([[0, 5, 16, 30], [1, 2, 17, 18]])

    class B:
        x0 = torch.rand(2, 12, 16, 16)
        labels = None
    target = gather_tokens(group_tokens(noise, 4, (3, 9)), keep)
    assert obj(lambda *a: target, B, keep, t, noise).item() == 0.0
    real = gather_tokens(token_valid(4, 4, (3, 9)).expand(2, -1, -1), keep)
    assert real.sum().item() == 2 * (2 * 48 + 2 * 144)  # LL tokens: 48 real values, details: 144
    pred = target + real  # every real value off by one, the padding exact (as the model's is)
    assert obj(lambda *a: pred, B, keep, t, noise).item() == pytest.approx(1.0)


def test_split_needs_dwt_input():
    with pytest.raises(ValueError, match="split needs the 12-channel"):
        ModelConfig(preset="tiny", in_channels=3, input_size=16, patch_size=4,
                    dwt_tokens="split").resolved()


def test_resize_pos_embed_keeps_the_extras_and_each_group_apart():
    from maskdm.model.uvit import resize_pos_embed
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 2 * 4 * 4, 8)
    assert resize_pos_embed(pos, 1, 2, (4, 4), (4, 4)) is pos  # the original size: unchanged
    out = resize_pos_embed(pos, 1, 2, (4, 4), (8, 6))
    assert out.shape == (1, 1 + 2 * 8 * 6, 8)
    assert torch.equal(out[:, :1], pos[:, :1])  # the time token is not a grid position
    for g in range(2):  # each token group is resized on its own grid
        alone = torch.cat([pos[:, :1], pos[:, 1 + 16 * g:1 + 16 * (g + 1)]], dim=1)
        assert torch.allclose(out[:, 1 + 48 * g:1 + 48 * (g + 1)],
                              resize_pos_embed(alone, 1, 1, (4, 4), (8, 6))[:, 1:])
    const = torch.full((1, 1 + 16, 8), 3.0)
    assert torch.allclose(resize_pos_embed(const, 1, 1, (4, 4), (8, 8)), torch.full((1, 65, 8), 3.0))
    ramp = torch.arange(16.0).reshape(1, 4, 4, 1).permute(0, 3, 1, 2)  # values by position
    row = resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp.reshape(1, 16, 1)], 1), 1, 1,
                           (4, 4), (8, 8))[0, 1:, 0].reshape(8, 8)
    assert row[0, 0] < row[0, -1] < row[-1, -1]  # the layout survives: left < right, top < bottom
    with pytest.raises(ValueError, match="pos_embed has 17 tokens"):
        resize_pos_embed(const, 1, 2, (4, 4), (8, 8))


# ----------------------------------------------------------------------------- MaskDiT decoder

def _maskdit(**kw) -> torch.nn.Module:
    return _tiny(in_channels=3, decoder_depth=2, decoder_dim=64, **kw)


def test_decoder_full_keep_idx_in_any_order_equals_the_unmasked_forward():
    """Each visible token's encoding reaches the decoder at its own position: keeping every token,
    listed in any order, gives the unmasked prediction of every token."""
    net = _maskdit()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([7, 600])
    n = net.cfg.num_tokens
    with torch.no_grad():
        full = patchify(net(x, t), 2)
        for keep in (torch.arange(n).expand(2, -1), torch.stack([torch.randperm(n)
                                                                 for _ in range(2)])):
            assert torch.allclose(net(x, t, keep), full, atol=1e-5)


def test_decoder_sees_mask_tokens_exactly_at_the_masked_positions():
    net = _maskdit()
    cfg = net.cfg
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([7, 600])
    keep = torch.tensor([[0, 3, 5, 6, 9, 14], [1, 2, 4, 8, 12, 15]])
    seen = {}
    def grab(module, args):  # returns None: the block's input stays as it is
        seen["y"] = args[0]
    hook = net.decoder_blocks[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        out = net(x, t, keep)
    hook.remove()
    assert out.shape == (2, cfg.num_tokens, 3 * 4)  # every token predicted
    tokens = seen["y"][:, cfg.extras:]
    empty = (net.mask_token + net.decoder_pos[:, cfg.extras:])[0]  # a mask token and its position
    for b in range(2):
        for i in range(cfg.num_tokens):
            is_mask = torch.allclose(tokens[b, i], empty[i], atol=1e-6)
            assert is_mask == (i not in keep[b].tolist()), (b, i)
    # the masked patches' content never reaches any prediction
    x2 = x.clone()
    masked = patchify(x2, 2)
    for b in range(2):
        hide = [i for i in range(cfg.num_tokens) if i not in keep[b].tolist()]
        masked[b, hide] = torch.randn(len(hide), masked.shape[-1])
    with torch.no_grad():
        out2 = net(unpatchify(masked, 2, 3, cfg.grid), t, keep)
    assert torch.allclose(out, out2, atol=1e-6)
    # ... while the masked positions' predictions are read from the visible tokens (the
    # decoder's attention): change one visible patch and every masked prediction moves
    x3 = patchify(x.clone(), 2)
    x3[:, keep[:, 0]] += 1.0
    with torch.no_grad():
        out3 = net(unpatchify(x3, 2, 3, cfg.grid), t, keep)
    for b in range(2):
        hide = [i for i in range(cfg.num_tokens) if i not in keep[b].tolist()]
        assert ((out3[b, hide] - out[b, hide]).abs().amax(-1) > 1e-6).all()
    with torch.no_grad():  # without a mask the decoder gets every encoder token: an image out
        assert net(x, t).shape == x.shape


def test_mae_loss_covers_only_the_masked_tokens():
    from maskdm.model.objective import mae_loss, masked_positions
    keep = torch.tensor([[0, 2, 3], [1, 4, 5]])
    assert masked_positions(keep, 6).tolist() == [[False, True, False, False, True, True],
                                                  [True, False, True, True, False, False]]
    x_t = torch.randn(2, 3, 4, 6)  # 2x3 tokens of patch 2
    pred = torch.randn(2, 6, 12, requires_grad=True)
    loss = mae_loss(pred, x_t, keep, 2)
    loss.backward()
    grad_nonzero = pred.grad.abs().sum(-1) > 0
    assert torch.equal(grad_nonzero, masked_positions(keep, 6))
    # target: the masked patches of x_t, each normalised to zero mean and unit variance
    target = patchify(x_t, 2)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    m = masked_positions(keep, 6)
    assert torch.allclose(mae_loss(target, x_t, keep, 2), torch.tensor(0.0), atol=1e-10)
    assert torch.allclose(loss, ((pred - target) ** 2).mean(-1)[m].mean())


def test_maskdit_objective_is_dsm_on_visible_plus_weighted_mae_on_masked():
    from maskdm.model.diffusion import GaussianDiffusion
    from maskdm.model.objective import DiffusionObjective, mae_loss
    net = _maskdit()
    diffusion = GaussianDiffusion("linear", 100)
    x0, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 50])
    noise = torch.randn_like(x0)
    keep = torch.tensor([[0, 3, 5, 6, 9, 14], [1, 2, 4, 8, 12, 15]])

    class B:
        labels, flips = None, None
    B.x0 = x0
    with torch.no_grad():
        x_t = diffusion.q_sample(x0, t, noise)
        pred = net(x_t, t, keep)
        dsm = ((gather_tokens(pred, keep) - gather_tokens(patchify(noise, 2), keep)) ** 2).mean()
        mae = mae_loss(pred, x_t, keep, 2)
        plain = DiffusionObjective.for_model(diffusion, net.cfg)(net, B, keep, t, noise)
        weighted = DiffusionObjective.for_model(diffusion, net.cfg, 0.1)(net, B, keep, t, noise)
    assert torch.allclose(plain, dsm) and torch.allclose(weighted, dsm + 0.1 * mae)
    with pytest.raises(ValueError, match="decoder"):
        DiffusionObjective.for_model(diffusion, _tiny().cfg, 0.1)


def test_decoder_presets_flops_and_config_errors():
    from maskdm.model.config import DECODERS
    from maskdm.model.flops import forward_flops
    cfg = ModelConfig(preset="MaskDiT-B", in_channels=12, input_size=128, patch_size=4)
    r = cfg.resolved()
    assert (r.decoder_depth, r.decoder_dim, r.decoder_heads) == (*DECODERS["MaskDiT-B"], 6)
    plain = ModelConfig(preset="MaskDM-B", in_channels=12, input_size=128, patch_size=4)
    assert plain.resolved().decoder_depth == 0
    # the decoder adds a cost that does not shrink with the mask: projection, blocks, head
    D, Dd, N, L = 768, 384, 32 * 32, 32 * 32 + 1
    blk = 2 * L * Dd * 3 * Dd + 4 * L * L * Dd + 2 * L * Dd * Dd + 4 * L * Dd * 4 * Dd
    head_diff = 2 * N * Dd * 192 - 2 * N * D * 192
    assert forward_flops(cfg) - forward_flops(plain) == 2 * L * D * Dd + 4 * blk + head_diff
    for visible in (100, 500):
        extra = forward_flops(cfg, visible) - forward_flops(plain, visible)
        head = 2 * N * Dd * 192 - 2 * visible * D * 192
        assert extra == 2 * (visible + 1) * D * Dd + 4 * blk + head
    with pytest.raises(ValueError, match="decoder_dim .* multiple of the head width"):
        ModelConfig(preset="tiny", decoder_depth=1, decoder_dim=100).architecture()
    with pytest.raises(ValueError, match="dwt_tokens: joint"):
        ModelConfig(preset="tiny", in_channels=12, input_size=8, decoder_depth=1,
                    dwt_tokens="split").resolved()
    net = _maskdit()
    n_dec = sum(p.numel() for n, p in net.named_parameters() if n.startswith("decoder"))
    assert n_dec > 0 and "mask_token" in dict(net.named_parameters())


def test_flip_condition_changes_the_output_and_defaults_to_unflipped():
    net = _tiny(flip_condition=True)
    assert net.cfg.extras == 2
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        net.flip_embed.weight.normal_()  # a trained-sized difference between the two flags
        unflipped = net(x, t, None, None, torch.tensor([0, 0]))
        flipped = net(x, t, None, None, torch.tensor([1, 1]))
        default = net(x, t)
        mixed = net(x, t, None, None, torch.tensor([True, False]))
    assert not torch.allclose(unflipped, flipped, atol=1e-3)
    assert torch.equal(default, unflipped)  # sampling passes no flags: flip = 0
    assert torch.allclose(mixed[0], flipped[0]) and torch.allclose(mixed[1], unflipped[1])
    plain = _tiny()
    with torch.no_grad():  # a model without flip conditioning ignores the flags
        assert torch.equal(plain(x, t, None, None, torch.tensor([1, 1])), plain(x, t))


# ----------------------------------------------------------------------------- pinned science
def _cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_by_hand(grid: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """[h, w] -> [nh, nw], align_corners=False (source x = (i + 0.5) * in / out - 0.5), borders
    clamped: the interpolation written out point by point."""
    h, w = grid.shape
    out = np.zeros(new)
    for i in range(new[0]):
        for j in range(new[1]):
            y, x = (i + 0.5) * h / new[0] - 0.5, (j + 0.5) * w / new[1] - 0.5
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            total = 0.0
            for m in range(-1, 3):
                for n in range(-1, 3):
                    yy, xx = min(max(y0 + m, 0), h - 1), min(max(x0 + n, 0), w - 1)
                    total += grid[yy, xx] * _cubic(y - (y0 + m)) * _cubic(x - (x0 + n))
            out[i, j] = total
    return out


def test_resize_pos_embed_equals_bicubic_by_hand_on_an_asymmetric_grid():
    """Every position and channel of a 2x3 grid (two token groups) has its own value; resized to
    3x5 each group and channel must equal the bicubic interpolation written out by hand, rows
    along the height and columns along the width (a transposed grid, a swapped target size, or
    another interpolation mode all fail here)."""
    from maskdm.model.uvit import resize_pos_embed
    h, w, nh, nw, dim, groups = 2, 3, 3, 5, 2, 2
    values = np.arange(groups * h * w * dim, dtype=np.float64) ** 1.5  # distinct, not linear
    pos = torch.cat([torch.full((1, 1, dim), -7.0),
                     torch.tensor(values, dtype=torch.float64).reshape(1, groups * h * w, dim)], 1)
    out = resize_pos_embed(pos, 1, groups, (h, w), (nh, nw))
    assert out.shape == (1, 1 + groups * nh * nw, dim)
    assert torch.equal(out[0, 0], pos[0, 0])
    tokens = out[0, 1:].reshape(groups, nh, nw, dim).numpy()
    for g in range(groups):
        for c in range(dim):
            grid = values.reshape(groups, h, w, dim)[g, :, :, c]  # token index = row * w + col
            np.testing.assert_allclose(tokens[g, :, :, c], _bicubic_by_hand(grid, (nh, nw)),
                                       rtol=1e-5, atol=1e-5)  # resized in float32


def _counted_flops(cfg, keep_idx) -> int:
    """Matmul FLOPs of one real forward pass (torch's FlopCounterMode) plus the attention
    products, which the counter does not see inside CPU SDPA: 2 * L^2 * D * 2 per block."""
    from torch.utils.flop_counter import FlopCounterMode

    from maskdm.model.config import build_model
    model = build_model(cfg)
    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, torch.tensor([3]), keep_idx)
    L = (keep_idx.shape[1] if keep_idx is not None else cfg.num_tokens) + cfg.extras
    return fc.get_total_flops() + (cfg.depth + 1) * 2 * L * L * cfg.dim * 2


@pytest.mark.parametrize("tokens", ["split", "joint"])
def test_the_flop_count_equals_what_the_model_computes(tokens):
    """model/flops.py against the real forward pass, masked and not: split DWT tokens (two
    embeddings and heads), joint tokens. The hand count of the split terms, for this 16x16x12
    input (patch 2: 64 cells, LL 12 and details 36 values per cell, D = 128): unmasked, each
    group embedded and predicted on its own tokens, 2*64*(12+36)*128 each way; masked to 32 + 32
    visible tokens, both groups are embedded whole (2*64*48*128) and both heads run on the 64
    visible tokens (2*64*128*48)."""
    from maskdm.model.config import ModelConfig
    from maskdm.model.flops import forward_flops
    cfg = ModelConfig(preset="tiny", in_channels=12, input_size=16, patch_size=2,
                      dwt_tokens=tokens, attention="sdpa").resolved()
    n = cfg.grid[0] * cfg.grid[1]
    keep = torch.cat([torch.arange(g * n, (g + 1) * n, 2) for g in range(cfg.token_groups)])
    assert forward_flops(cfg) == _counted_flops(cfg, None)
    assert forward_flops(cfg, len(keep)) == _counted_flops(cfg, keep.unsqueeze(0))
    if tokens == "split":  # by hand: 5 blocks of 24*L*D^2 + 4*L^2*D, 2 long skips of 4*L*D^2
        D = 128
        for L, embed, head in ((129, 2 * 64 * (12 + 36) * D, 2 * 64 * D * (12 + 36)),
                               (65, 2 * 64 * 48 * D, 2 * 64 * D * 48)):
            hand = 5 * (24 * L * D * D + 4 * L * L * D) + 2 * 4 * L * D * D + embed + head
            assert forward_flops(cfg, None if L == 129 else 64) == hand


def test_the_final_conv_starts_as_the_identity_and_only_sees_whole_images():
    """U-ViT's optional final 3x3 conv: zero-initialised and residual (a model with it predicts
    what the same model without it does), applied to whole-image predictions only (the masked
    forward of MSM is unchanged), trained by DSM, and counted in the FLOPs."""
    from maskdm.model.config import ModelConfig, build_model
    from maskdm.model.flops import forward_flops
    kw = dict(preset="tiny", in_channels=3, input_size=16, patch_size=4, attention="sdpa")
    plain = build_model(ModelConfig(**kw))
    conv = build_model(ModelConfig(**kw, final_conv=True))
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["final_conv.weight", "final_conv.bias"]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    assert torch.equal(plain(x, t), conv(x, t))
    with torch.no_grad():
        conv.final_conv.weight.normal_(0, 0.1)
    assert not torch.allclose(plain(x, t), conv(x, t))
    assert torch.equal(plain(x, t, keep), conv(x, t, keep))  # masked: no conv
    eps = conv(x, t)
    eps.square().mean().backward()
    assert conv.final_conv.weight.grad.abs().sum() > 0
    cfg = ModelConfig(**kw, final_conv=True).resolved()
    base = ModelConfig(**kw).resolved()
    assert forward_flops(cfg) - forward_flops(base) == 2 * 9 * 3 * 3 * 16 * 16
    assert forward_flops(cfg, 4) == forward_flops(base, 4)
