"""Weight-free metrics with known answers: sliced Wasserstein distance (point sets, Laplacian
pyramid patches, whole images) and the held-out denoising loss; `maskdm score` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from maskdm.model.diffusion import GaussianDiffusion
from maskdm.pipeline.eval.heldout import heldout_loss
from maskdm.pipeline.eval.swd import laplacian_pyramid, sliced_wasserstein, swd_scores
from maskdm.preprocessing.procedural import render
from tests.conftest import ROOT, shard_set


def _unit_sphere_abs_mean(d: int) -> float:
    """E|theta_1| for theta uniform on the unit sphere in d dimensions."""
    return math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))


def test_swd_of_point_sets_matches_the_analytic_values():
    g = np.random.default_rng(0)
    d, n = 8, 20000
    a = g.standard_normal((n, d))
    assert sliced_wasserstein(a, a) == 0.0
    shifted = g.standard_normal((n, d))
    shifted[:, 0] += 1.0  # W1 of every projection is |theta . delta|
    assert sliced_wasserstein(a, shifted) == pytest.approx(_unit_sphere_abs_mean(d), rel=0.06)
    scaled = 2.0 * g.standard_normal((n, d))  # projections N(0, 1) vs N(0, 4): W1 = sqrt(2/pi)
    assert sliced_wasserstein(a, scaled) == pytest.approx(math.sqrt(2 / math.pi), rel=0.03)
    assert sliced_wasserstein(a, g.standard_normal((n, d))) < 0.03  # same law, new draw


def test_laplacian_pyramid_reconstructs_the_image():
    x = torch.rand(2, 3, 64, 64)
    levels = laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    from maskdm.pipeline.eval.swd import _blur
    cur = levels[-1]
    for lap in reversed(levels[:-1]):  # collapse: up(coarse) + detail
        up = torch.zeros_like(lap)
        up[..., ::2, ::2] = cur
        cur = lap + _blur(up, gain=4.0)
    assert torch.allclose(cur, x, atol=1e-5)


def _faces(seed: int, n: int = 300, size: int = 32) -> np.ndarray:
    return np.stack([render(seed, i, size) for i in range(n)])


def test_image_swd_is_zero_for_identical_sets_and_grows_with_corruption():
    ref, same_law = _faces(1), _faces(2)
    assert swd_scores(ref, ref)["swd_patch"] == 0.0 and swd_scores(ref, ref)["swd_image"] == 0.0
    g = np.random.default_rng(0)
    scores = [swd_scores(same_law, ref)["swd_patch"]]
    for sigma in (6, 20, 60):
        noisy = np.clip(same_law + g.normal(0, sigma, same_law.shape), 0, 255).astype(np.uint8)
        scores.append(swd_scores(noisy, ref)["swd_patch"])
    assert scores == sorted(scores) and scores[-1] > 3 * scores[0], scores
    dark = (same_law * 0.6).astype(np.uint8)  # a colour/brightness shift shows on whole images
    assert swd_scores(dark, ref)["swd_image"] > 3 * swd_scores(same_law, ref)["swd_image"]


def test_every_corruption_raises_the_patch_swd_well_above_the_real_floor():
    """A uniform colour shift, a gain change, added noise and blur each put the patch SWD far
    above the floor of two sets of real faces (descriptors normalised with the reference set's
    statistics; with each set's own, the shift and the gain left it at the floor)."""
    from scipy.ndimage import gaussian_filter
    ref, real = _faces(1, 256), _faces(2, 256)
    floor = swd_scores(real, ref)["swd_patch"]
    g = np.random.default_rng(0)
    x = real.astype(np.float64)
    shifted, gained, noisy = x.copy(), x.copy(), x + g.normal(0, 20, x.shape)
    shifted[..., 0] += 40
    gained[..., 2] *= 0.6
    blurred = gaussian_filter(x, sigma=(0, 1.0, 1.0, 0))
    for name, bad in (("red +40", shifted), ("blue x 0.6", gained), ("noise sd 20", noisy),
                      ("blur sigma 1", blurred)):
        score = swd_scores(np.clip(bad, 0, 255).astype(np.uint8), ref)["swd_patch"]
        assert score > 3 * floor, (name, score, floor)


def test_patch_descriptors_are_7x7_neighbourhoods_normalised_by_the_reference():
    """The descriptors against a direct computation: the 7x7 window around each drawn centre
    (rows along the height), each channel scaled by the reference descriptors' mean and std."""
    from maskdm.pipeline.eval.swd import _descriptors, normalise
    level = torch.arange(2 * 3 * 11 * 12, dtype=torch.float32).reshape(2, 3, 11, 12) ** 1.3
    d = _descriptors(level, 4, np.random.default_rng(5))
    rng = np.random.default_rng(5)  # the same draws: centres ys, then xs
    ys, xs = rng.integers(3, 8, size=(2, 4)), rng.integers(3, 9, size=(2, 4))
    for i in range(2):
        for k in range(4):
            window = level[i, :, ys[i, k] - 3:ys[i, k] + 4, xs[i, k] - 3:xs[i, k] + 4]
            assert torch.equal(d[i * 4 + k], window.permute(1, 2, 0).reshape(49, 3))
    ref = d.flip(0) * 2 + 1
    flat = ref.reshape(-1, 3)
    want = ((d - flat.mean(0)) / flat.std(0)).reshape(len(d), -1)
    assert torch.allclose(normalise(d, ref), want, atol=1e-6)


def test_heldout_loss_is_deterministic_and_exact():
    d = GaussianDiffusion("cosine", 1000)
    x0 = torch.rand(5, 3, 8, 8) * 2 - 1

    class Zero(torch.nn.Module):
        def forward(self, x, t, keep_idx=None, labels=None):
            return torch.zeros_like(x)

    class Oracle(torch.nn.Module):  # knows x0: recovers the noise exactly
        def forward(self, x, t, keep_idx=None, labels=None):
            ab = torch.tensor(d.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0[: len(x)]) / (1 - ab).sqrt()

    a = heldout_loss(Zero(), d, x0, grid=(10, 500), seed=3, batch=2)
    b = heldout_loss(Zero(), d, x0, grid=(10, 500), seed=3, batch=5)
    assert a == pytest.approx(b, rel=1e-6)  # the same noise whatever the batch size
    assert set(a) == {"loss", "loss_t10", "loss_t500"}
    assert a["loss"] == pytest.approx(1.0, abs=0.15)  # E[eps^2] = 1 for the zero predictor
    assert heldout_loss(Oracle(), d, x0, grid=(10, 500), seed=3, batch=5)["loss"] < 1e-6
    assert heldout_loss(Zero(), d, x0, grid=(10, 500), seed=4)["loss"] != a["loss"]


@pytest.mark.slow
def test_score_command_end_to_end(tmp_path):
    shards = shard_set(tmp_path, "s", count=40, samples_per_shard=20)
    run_dir = tmp_path / "run"
    from tests.test_train import run_train
    r = run_train(shards, run_dir, "train.steps=4", "train.ckpt_every=4", "eval.score_every=2",
                  "eval.score_samples=8", f"eval.heldout={shards}", "eval.heldout_n=4",
                  "eval.batch=4")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ": SWD x1e3 patches " in ln]
    assert [ln.split(":")[0] for ln in lines] == ["step 2", "step 4"], r.stdout[-2000:]
    assert all("held-out loss" in ln for ln in lines)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "maskdm"]
    r = subprocess.run(base + ["sample", "--ckpt", str(run_dir), "--n", "16", "--batch", "8",
                               "--out", str(tmp_path / "smp")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(base + ["score", "--samples", str(tmp_path / "smp"), "--ref", str(shards),
                               "--ckpt", str(run_dir), "--heldout", str(shards),
                               "--heldout-n", "8", "--json", str(tmp_path / "s.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["n"] == 16 and res["heldout_n"] == 8 and res["swd_patch"] > 0 and res["loss"] > 0
    assert "relative measure" in r.stdout
    bad = subprocess.run(base + ["score", "--samples", str(tmp_path / "smp")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--samples and --ref go together" in bad.stderr
