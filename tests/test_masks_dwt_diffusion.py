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


def _cosine_alpha_bar(t: np.ndarray, T: int = 1000, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
    for the t-th noising step (t = 0 is one step of noise)."""
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    return f(t + 1.0) / f(0.0)


def test_schedule_values_are_pinned_to_their_closed_forms():
    """End points alone let a wrong offset (s = 0) or a wrong beta range through."""
    t = np.array([0, 1, 10, 100, 250, 500, 750, 900, 980])
    cos = GaussianDiffusion("cosine", 1000).alphas_cumprod
    np.testing.assert_allclose(cos[t], _cosine_alpha_bar(t), rtol=1e-9)
    assert cos[0] == pytest.approx(0.99996, abs=1e-5)  # s = 0 would give 0.9999975
    assert cos[500] == pytest.approx(0.492285, abs=1e-6)  # s = 0: 0.498429
    lin = GaussianDiffusion("linear", 1000).alphas_cumprod
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(lin[t], np.cumprod(1 - betas)[t], rtol=1e-12)
    assert lin[0] == pytest.approx(0.9999) and lin[999] == pytest.approx(4.036e-5, rel=1e-3)


def _gaussian_oracle(d: GaussianDiffusion, mu: float, sigma: float):
    """The exact eps-prediction E[eps | x_t] for data x0 ~ N(mu, sigma^2) (every coordinate)."""
    ab_table = torch.tensor(d.alphas_cumprod, dtype=torch.float64)

    def oracle(x, t, keep_idx=None, labels=None):
        ab = ab_table[t].view(-1, *([1] * (x.ndim - 1)))
        x = x.double()
        return ((1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sigma ** 2 + 1 - ab)).float()
    return oracle


@pytest.mark.parametrize("sampler,eta,steps", [("ddpm", 0.0, 1000), ("ddpm", 0.0, 250),
                                               ("ddim", 0.0, 250), ("ddim", 1.0, 1000)])
def test_samplers_draw_gaussian_data_with_the_right_mean_and_spread(sampler, eta, steps):
    """With the exact eps of Gaussian data, DDPM and DDIM must reproduce its mean and standard
    deviation (a one-point data set cannot tell a sampler that ignores x_t from a correct one)."""
    d = GaussianDiffusion("cosine", 1000)
    mu, sigma = 0.3, 0.2
    gen = torch.Generator().manual_seed(0)
    out = d.sample(_gaussian_oracle(d, mu, sigma), (40000, 1, 1, 1), sampler=sampler,
                   steps=steps, eta=eta, generator=gen, clip=False).flatten()
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(sigma, rel=0.04)


def test_ddpm_with_few_steps_has_the_chains_exact_spread():
    """With few steps the ancestral chain's output spread is not the data's, but it is known in
    closed form (everything is linear-Gaussian): x_T ~ N(0, 1); each step is
    x_prev = c0 * x0_hat(x) + c1 * x + sqrt(var) z with the posterior q(x_prev | x_t, x0) of the
    respaced chain (var = beta_tilde, not beta). Pins the sampler's update, variance included."""
    d = GaussianDiffusion("cosine", 1000)
    mu, sigma, steps = 0.3, 0.2, 8
    gen = torch.Generator().manual_seed(1)
    out = d.sample(_gaussian_oracle(d, mu, sigma), (200000, 1, 1, 1), sampler="ddpm",
                   steps=steps, generator=gen, clip=False).double().flatten()
    ts = d.timesteps(steps)
    m, v = 0.0, 1.0  # mean and variance of x, starting from x_T ~ N(0, 1)
    for i, t in enumerate(ts):
        ab = d.alphas_cumprod[t]
        ab_prev = d.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else 1.0
        # x0_hat = E[x0 | x_t] = a * x + b for Gaussian data
        a = np.sqrt(ab) * sigma ** 2 / (ab * sigma ** 2 + 1 - ab)
        b = mu * (1 - ab) / (ab * sigma ** 2 + 1 - ab)
        if i + 1 == len(ts):
            m, v = a * m + b, a * a * v
            break
        beta = 1 - ab / ab_prev
        c0 = np.sqrt(ab_prev) * beta / (1 - ab)
        c1 = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        var = beta * (1 - ab_prev) / (1 - ab)
        m, v = (c0 * a + c1) * m + c0 * b, (c0 * a + c1) ** 2 * v + var
    assert out.mean().item() == pytest.approx(m, abs=2e-3)
    assert out.std().item() == pytest.approx(np.sqrt(v), rel=0.01)


def test_msm_loss_is_the_noise_error_on_the_visible_patches_exactly():
    """Hand-computed MSM loss on a tiny input: the target is the noise (not x0) at exactly the
    visible token positions, and an oracle that predicts that noise has loss 0."""
    d = GaussianDiffusion("linear", 1000)
    obj = DiffusionObjective(d, patch_size=2)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=gen)
    t = torch.tensor([3, 600])
    keep = torch.tensor([[0, 3], [1, 2]])  # 2 of the 4 tokens (2x2 grid of 2x2 patches)

    class B:
        labels = None
    B.x0 = x0

    def tok(x, b, k):  # token k of image b: its 2x2 patch, row-major
        r, c = divmod(k, 2)
        return x[b, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].flatten()

    pred = torch.arange(16, dtype=torch.float32).view(2, 2, 4) / 10
    want = sum(((pred[b, i] - tok(noise, b, keep[b, i].item())) ** 2).sum()
               for b in range(2) for i in range(2)) / 16
    got = obj(lambda x_t, tt, keep_idx, labels: pred, B, keep, t, noise)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)

    ab = torch.tensor(d.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)

    def oracle(x_t, tt, keep_idx, labels):  # recovers the noise from x_t, then keeps the visible
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.stack([torch.stack([tok(eps, b, k) for k in keep_idx[b].tolist()])
                            for b in range(2)])
    assert obj(oracle, B, keep, t, noise).item() < 1e-10



def test_min_snr_weights_cap_only_the_nearly_clean_steps():
    """min(SNR, gamma) / SNR from the schedule's own alpha-bar: 1 wherever SNR <= gamma (the noisy
    steps), SNR-proportionally smaller where the noise is weak, never above 1."""
    for schedule in ("cosine", "linear"):
        d = GaussianDiffusion(schedule, 1000)
        t = torch.arange(1000)
        w = d.min_snr_weight(t, 5.0).double()
        ac = torch.tensor(d.alphas_cumprod)
        snr = ac / (1 - ac)
        want = torch.where(snr > 5, 5 / snr, torch.ones_like(snr))
        assert torch.allclose(w, want, rtol=1e-5)
        assert (w <= 1).all() and w[-1] == 1 and w[0] < 0.01
        assert (w[1:] >= w[:-1] - 1e-7).all()  # more noise, no smaller weight


def test_min_snr_loss_weighs_each_sample_by_its_timestep_dsm_and_msm():
    """The same predictions under uniform and min-SNR weighting: DSM and MSM losses are each
    sample's MSE times its weight, averaged as before; uniform is the plain MSE."""
    d = GaussianDiffusion("cosine", 1000)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(3, 1, 4, 4, generator=gen)
    t = torch.tensor([2, 100, 990])  # weights ~0.001, ~0.14, 1
    w = d.min_snr_weight(t, 5.0)
    assert w[0] < 0.01 and 0.01 < w[1] < 1 and w[2] == 1

    class B:
        labels = None
    B.x0 = x0
    full = torch.randn(3, 1, 4, 4, generator=gen)
    keep = torch.tensor([[0, 3], [1, 2], [0, 1]])
    vis = torch.randn(3, 2, 4, generator=gen)
    per_full = ((full - noise) ** 2).flatten(1).mean(1)
    tokens = noise.view(3, 1, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 4, 4)
    per_vis = torch.stack([((vis[b] - tokens[b, keep[b]]) ** 2).mean() for b in range(3)])
    for name, weight in (("uniform", torch.ones(3)), ("min_snr", w)):
        obj = DiffusionObjective(d, patch_size=2, loss_weight=name, min_snr_gamma=5.0)
        dsm = obj(lambda *a: full, B, None, t, noise)
        msm = obj(lambda *a: vis, B, keep, t, noise)
        assert dsm.item() == pytest.approx((per_full * weight).mean().item(), rel=1e-5)
        assert msm.item() == pytest.approx((per_vis * weight).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="loss_weight"):
        DiffusionObjective(d, patch_size=2, loss_weight="snr")

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
