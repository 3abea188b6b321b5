"""Masks (exact counts, structure, reproducibility), torch Haar DWT, diffusion and its training."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from maskdm.model import ModelConfig, build_model
from maskdm.model import dwt as tdwt
from maskdm.model.diffusion import GaussianDiffusion
from maskdm.model.masks import MaskSpec, MaskSpecError, block, crop, patch, sample_keep_idx
from maskdm.model.objective import DiffusionObjective
from maskdm.pipeline.randomness import draw_step
from maskdm.shardformat import haar

# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_patch_mask_exact_count_sorted_unique(ratio, seed):
    grid = (16, 16)
    keep = sample_keep_idx(patch(ratio), 8, grid, torch.Generator().manual_seed(seed))
    assert keep.shape == (8, 256 - round(ratio * 256))
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted and unique
    assert keep.min() >= 0 and keep.max() < 256


@pytest.mark.parametrize("b", [2, 4, 8])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_block_mask_structure(b, ratio):
    grid = (16, 16)
    spec = block(ratio, b)
    keep = sample_keep_idx(spec, 5, grid, torch.Generator().manual_seed(b))
    nb = (16 // b) ** 2
    assert keep.shape[1] == (nb - round(ratio * nb)) * b * b
    for row in keep:
        vis = torch.zeros(256, dtype=torch.bool)
        vis[row] = True
        blocks = vis.view(16 // b, b, 16 // b, b).permute(0, 2, 1, 3).reshape(nb, b * b)
        assert (blocks.all(1) | ~blocks.any(1)).all(), "every block fully visible or fully masked"
        assert (row[1:] > row[:-1]).all()


def test_crop_mask_is_a_window():
    keep = sample_keep_idx(crop(5), 6, (16, 16), torch.Generator().manual_seed(0))
    assert keep.shape == (6, 25)
    for row in keep:
        r, c = row // 16, row % 16
        assert r.max() - r.min() == 4 and c.max() - c.min() == 4
        assert (row[1:] > row[:-1]).all()


def test_masks_reproducible_and_varied():
    a = sample_keep_idx(block(0.7, 2), 4, (8, 8), torch.Generator().manual_seed(3))
    b = sample_keep_idx(block(0.7, 2), 4, (8, 8), torch.Generator().manual_seed(3))
    c = sample_keep_idx(block(0.7, 2), 4, (8, 8), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples in a batch differ


@pytest.mark.parametrize("chunk", [3, 64])
def test_step_randomness_is_independent_of_how_the_batch_is_split(chunk):
    """Rank slices of a global batch get exactly the draws the whole batch would get."""
    kw = dict(sample_shape=(12, 8, 8), num_timesteps=1000, spec=block(0.5, 2), grid=(4, 4),
              device="cpu", chunk=chunk)
    whole = draw_step(0, 7, 8, 0, 8, **kw)
    parts = [draw_step(0, 7, 8, lo, lo + 2, **kw) for lo in range(0, 8, 2)]
    assert torch.equal(torch.cat([p.t for p in parts]), whole.t)
    assert torch.equal(torch.cat([p.noise for p in parts]), whole.noise)
    assert torch.equal(torch.cat([p.keep_idx for p in parts]), whole.keep_idx)
    other = draw_step(0, 8, 8, 0, 8, **kw)
    assert not torch.equal(other.noise, whole.noise)  # a new step, new randomness
    assert not torch.equal(whole.noise[0], whole.noise[1])
    assert abs(whole.noise.std().item() - 1) < 0.1


def test_no_mask_means_none():
    assert sample_keep_idx(MaskSpec(), 2, (4, 4), torch.Generator()) is None
    assert sample_keep_idx(patch(0.0), 2, (4, 4), torch.Generator()) is None


@pytest.mark.parametrize("spec,msg", [
    (patch(1.0), "mask.ratio must be in"),
    (patch(-0.1), "mask.ratio must be in"),
    (block(0.5, 3), "block_size 3 must divide"),
    (crop(17), "crop_size 17 must be in"),
    (crop(0), "crop_size 0 must be in"),
    (MaskSpec("random"), "mask.kind"),
])
def test_invalid_mask_specs(spec, msg):
    with pytest.raises(MaskSpecError, match=msg):
        spec.validate((16, 16))


# ----------------------------------------------------------------------------- DWT

def test_torch_dwt_matches_pywavelets():
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    ours = tdwt.dwt(img.double())
    for i in range(2):
        ll, (h, v, d) = pywt.dwt2(img[i].double().numpy(), "haar", axes=(-2, -1))
        ref = np.concatenate([ll, h, v, d])
        assert np.allclose(ours[i].numpy(), ref, atol=1e-9)
    assert torch.equal(tdwt.idwt(ours).round().to(torch.uint8), img)


def test_torch_dwt_matches_shard_encoder_and_model_space():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    stored = torch.from_numpy(haar.dwt_uint8(img).astype(np.float32))
    ours = tdwt.dwt(torch.from_numpy(img).permute(2, 0, 1)[None].float())[0]
    assert torch.equal(ours, stored)
    ms = tdwt.model_from_image(torch.from_numpy(img).permute(2, 0, 1)[None])[0]
    assert torch.allclose(ms, torch.from_numpy(haar.to_model_space(haar.dwt_uint8(img))), atol=1e-7)
    back = tdwt.image_from_model(ms[None])[0].permute(1, 2, 0).numpy()
    assert np.array_equal(back, img)


def test_inverse_is_exact_in_float32():
    x = torch.randint(0, 256, (3, 3, 32, 32)).float()
    assert torch.equal(tdwt.idwt(tdwt.dwt(x)), x)


def test_dwt_domain_flip_equals_dwt_of_flipped_image():
    x = torch.randint(0, 256, (2, 3, 16, 16)).float()
    assert torch.equal(tdwt.flip(tdwt.dwt(x)), tdwt.dwt(x.flip(-1)))
    assert torch.equal(tdwt.flip(tdwt.flip(tdwt.dwt(x))), tdwt.dwt(x))


# ----------------------------------------------------------------------------- diffusion

def test_schedules():
    for name in ("cosine", "linear"):
        d = GaussianDiffusion(name, 1000)
        ac = d.alphas_cumprod
        assert ac[0] > 0.99 and ac[-1] < 0.01 and np.all(np.diff(ac) < 0)
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion("quadratic")


def test_q_sample_statistics():
    d = GaussianDiffusion("cosine", 1000)
    x0 = torch.full((20000, 1), 0.5)
    noise = torch.randn_like(x0)
    t = torch.full((20000,), 999)
    xt = d.q_sample(x0, t, noise)
    assert abs(xt.mean()) < 0.05 and abs(xt.std() - 1) < 0.05


class _Net(torch.nn.Module):
    """Wraps a model to count calls (so the sampler is known to use the network)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *a):
        self.calls += 1
        return self.inner(*a)


def _tiny_dwt(size=8):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", in_channels=12, input_size=size, patch_size=2,
                                   attention="sdpa"))


def test_ddim_eta0_deterministic_and_seeds_are_per_sample():
    d = GaussianDiffusion("cosine", 1000)
    net = _Net(_tiny_dwt().eval())
    a = d.sample(net, (3, 12, 8, 8), steps=10, eta=0.0, seeds=[1, 2, 3])
    b = d.sample(net, (3, 12, 8, 8), steps=10, eta=0.0, seeds=[1, 2, 3])
    assert net.calls == 20 and torch.equal(a, b)
    c = d.sample(net, (1, 12, 8, 8), steps=10, eta=0.0, seeds=[3])
    assert torch.allclose(a[2:], c, atol=1e-5)  # the image depends on its seed, not the batch
    e = d.sample(net, (3, 12, 8, 8), steps=10, eta=1.0, seeds=[1, 2, 3])
    assert not torch.allclose(a, e)
    p = d.sample(net, (2, 12, 8, 8), sampler="ddpm", steps=25, seeds=[1, 2])
    assert p.shape == (2, 12, 8, 8) and p.abs().max() <= 1.0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_recover_the_point_an_oracle_denoises_to(sampler):
    """With the exact eps of a one-point data set, both samplers must land on that point."""
    d = GaussianDiffusion("cosine", 1000)
    target = torch.rand(1, 12, 8, 8) * 2 - 1
    ab_table = torch.tensor(d.alphas_cumprod, dtype=torch.float32)

    def oracle(x, t, keep_idx=None, labels=None):
        ab = ab_table[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()
    out = d.sample(oracle, (3, 12, 8, 8), sampler=sampler, steps=20, seeds=[0, 1, 2])
    assert (out - target).abs().max() < 1e-4


def test_msm_loss_only_sees_visible_patches():
    d = GaussianDiffusion("cosine", 1000)
    obj = DiffusionObjective(d, patch_size=2)
    net = _tiny_dwt()

    class B:
        x0 = torch.randn(2, 12, 8, 8).clamp(-1, 1)
        labels = None

    keep = sample_keep_idx(patch(0.75), 2, (4, 4), torch.Generator().manual_seed(0))
    t, noise = torch.tensor([10, 500]), torch.randn(2, 12, 8, 8)
    l1 = obj(net, B, keep, t, noise)
    B.x0 = B.x0.clone()
    vis = torch.zeros(2, 16, dtype=torch.bool)
    vis.scatter_(1, keep, True)
    for i in range(2):  # change masked patches of x0 only
        for tok in (~vis[i]).nonzero().flatten().tolist():
            r, c = divmod(tok, 4)
            B.x0[i, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 0.9
    l2 = obj(net, B, keep, t, noise)
    assert torch.equal(l1, l2)
    l_full = obj(net, B, None, t, noise)
    assert l_full.ndim == 0 and torch.isfinite(l_full)


def test_tiny_model_learns_and_samples_move_toward_data():
    """A few hundred CPU steps of DSM on 4 images: loss drops clearly, samples approach the data."""
    from maskdm.preprocessing.procedural import render
    imgs = torch.stack([torch.from_numpy(render(0, i, 16)).permute(2, 0, 1) for i in range(4)])
    data = tdwt.model_from_image(imgs)  # [4, 12, 8, 8]
    d = GaussianDiffusion("cosine", 1000)
    obj = DiffusionObjective(d, patch_size=2)
    net = _tiny_dwt()
    sample_before = d.sample(net.eval(), (8, 12, 8, 8), steps=20, seeds=list(range(8)))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0)

    class B:
        labels = None

    losses = []
    net.train()
    for step in range(400):
        B.x0 = data.repeat(2, 1, 1, 1)
        r = draw_step(0, step, 8, 0, 8, (12, 8, 8), 1000, MaskSpec(), (4, 4), "cpu")
        loss = obj(net, B, None, r.t, r.noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:40]), np.mean(losses[-40:])
    assert last < 0.6 * first, f"DSM loss {first:.3f} -> {last:.3f}"
    sample_after = d.sample(net.eval(), (8, 12, 8, 8), steps=20, seeds=list(range(8)))

    def nn_dist(s):
        return torch.cdist(s.flatten(1), data.flatten(1)).min(dim=1).values.mean().item()
    before, after = nn_dist(sample_before), nn_dist(sample_after)
    assert after < 0.7 * before, f"nearest-image distance {before:.3f} -> {after:.3f}"
