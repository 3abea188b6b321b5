"""Evaluation: sampling is deterministic per seed and independent of the world size, resumes a
partial folder; FID statistics and the Fréchet distance are right; missing weights give the
documented error; training-time FID, export and raw-weight sampling work end to end.

The real FID weights are a download, so FID runs here use ``standin_inception`` (conftest): the
same network and file layout with seeded random weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdm.pipeline.cli import main as cli
from maskdm.pipeline.eval.fid import Accumulator, FIDStats, frechet_distance
from maskdm.pipeline.eval.inception import (
    WEIGHTS_FILE,
    WEIGHTS_SHA256_PREFIX,
    MissingWeights,
    load_inception,
)
from tests.conftest import ROOT, shard_set
from tests.test_train import _env, _port, run_train


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def sample_cmd(src: Path, out: Path, *extra: str, ranks: int = 1) -> list[str]:
    head = [sys.executable, "-m", "maskdm"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
         "--master_port", _port(), "-m", "maskdm"]
    return head + ["sample", "--ckpt", str(src), "--num-images", "6", "--batch", "4",
                   "--steps", "5", "--out", str(out), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """An export folder of a randomly initialised tiny DWT model (32 px images)."""
    from safetensors.torch import save_file

    from maskdm.model import ModelConfig, build_model
    mcfg = ModelConfig(preset="tiny", in_channels=12, input_size=16, patch_size=2,
                       attention="sdpa").resolved()
    torch.manual_seed(0)
    net = build_model(mcfg)
    out = tmp_path_factory.mktemp("export")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "format": "maskdm-export", "format_version": 1, "model": asdict(mcfg), "image_size": 32,
        "space": "dwt", "diffusion": {"schedule": "cosine", "num_timesteps": 1000},
        "stage": "pretrain", "step": 0}))
    return out


# ----------------------------------------------------------------------------- sampling

@pytest.mark.slow
def test_sampling_is_deterministic_and_independent_of_world_size(export_dir, tmp_path):
    r1 = run(sample_cmd(export_dir, tmp_path / "a"))
    assert r1.returncode == 0, r1.stderr
    a = pixels(tmp_path / "a")
    assert sorted(a) == [f"{i:06d}.png" for i in range(6)]
    assert a["000000.png"].shape == (32, 32, 3)
    assert not np.array_equal(a["000000.png"], a["000001.png"])

    assert run(sample_cmd(export_dir, tmp_path / "b")).returncode == 0
    r2 = run(sample_cmd(export_dir, tmp_path / "c", ranks=2))
    assert r2.returncode == 0, r2.stderr
    assert "on 2 rank(s)" in r2.stdout
    for other in ("b", "c"):
        o = pixels(tmp_path / other)
        assert sorted(o) == sorted(a)
        for name in a:
            assert np.array_equal(a[name], o[name]), (other, name)

    r3 = run(sample_cmd(export_dir, tmp_path / "d", "--seed", "1"))
    assert r3.returncode == 0
    assert not np.array_equal(pixels(tmp_path / "d")["000000.png"], a["000000.png"])


@pytest.mark.slow
def test_sampling_resumes_a_partial_folder_and_refuses_other_settings(export_dir, tmp_path):
    out = tmp_path / "s"
    assert run(sample_cmd(export_dir, out)).returncode == 0
    full = pixels(out)
    (out / "000001.png").unlink()
    (out / "000005.png").unlink()
    (out / ".000002.png.tmp-4242").write_bytes(b"half a png")  # an interrupted write
    r = run(sample_cmd(export_dir, out))
    assert r.returncode == 0, r.stderr
    assert "2 written now, 4 already there" in r.stdout
    assert not list(out.glob(".*.tmp*"))
    again = pixels(out)
    assert sorted(again) == sorted(full)
    assert all(np.array_equal(full[k], again[k]) for k in full)

    r = run(sample_cmd(export_dir, out, "--steps", "7"))
    assert r.returncode == 2
    assert "other settings" in r.stderr and "steps: 5 -> 7" in r.stderr

    r = run(sample_cmd(tmp_path / "nowhere", tmp_path / "x"))
    assert r.returncode == 2
    assert "no complete checkpoint" in r.stderr and "maskdm export" in r.stderr


# ----------------------------------------------------------------------------- FID math

def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_equals_an_independent_scipy_computation():
    from scipy import linalg
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    y = 0.6 * x + rng.normal(size=(400, 24)) + 0.3
    (m1, s1), (m2, s2) = _stats(x), _stats(y)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-7)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-8 * np.trace(s1)


def test_accumulator_matches_numpy_and_merges_across_pieces():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)) * 3 + 5
    whole = Accumulator(16)
    whole.add(x)
    parts = [Accumulator(16) for _ in range(3)]
    for i, p in enumerate(parts):
        p.add(x[i::3])
    merged = Accumulator(16)
    merged.n = sum(p.n for p in parts)
    merged.sum = sum(p.sum for p in parts)
    merged.outer = sum(p.outer for p in parts)
    for acc in (whole, merged):
        s = acc.stats("f", "x")
        np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_fid_is_zero_for_a_set_against_itself_and_grows_with_noise(standin_inception):
    from maskdm.pipeline.eval.fid import features
    from maskdm.preprocessing.procedural import render
    net, fid_id = load_inception(standin_inception)
    assert fid_id.startswith("inception-custom-")
    clean = [render(7, i, 32) for i in range(40)]
    ref = Accumulator(2048)
    ref.add(features(net, clean, "cpu"))
    r = ref.stats(fid_id, "clean")
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (0, 12, 40, 100):
        noisy = [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8)
                 for im in clean] if sigma else clean
        acc = Accumulator(2048)
        acc.add(features(net, noisy, "cpu"))
        g = acc.stats(fid_id, f"noise {sigma}")
        fids.append(frechet_distance(g.mu, g.sigma, r.mu, r.sigma))
    assert abs(fids[0]) < 1e-6 * max(fids[1:])
    assert fids[0] < fids[1] < fids[2] < fids[3], fids


def test_missing_or_wrong_weights_give_the_documented_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MASKDM_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MissingWeights) as e:
        load_inception(None)
    msg = str(e.value)
    assert WEIGHTS_FILE in msg and WEIGHTS_SHA256_PREFIX in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    assert "--inception-weights" in msg

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "0.png")
    assert cli(["fid", "--samples", str(folder), "--ref", str(folder)]) == 2
    assert WEIGHTS_FILE in capsys.readouterr().err

    bogus = tmp_path / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bogus)
    with pytest.raises(MissingWeights, match="does not hold FID Inception weights"):
        load_inception(bogus)


# ----------------------------------------------------------------------------- FID commands

@pytest.mark.slow
def test_fid_stats_and_fid_commands(standin_inception, tmp_path, capsys):
    from maskdm.pipeline.eval.fid import stats_path
    from maskdm.preprocessing.preview import read_samples
    from maskdm.shardformat.manifest import load_manifest
    w = ["--inception-weights", str(standin_inception), "--batch", "16"]
    shards = shard_set(tmp_path, "ref", count=40, samples_per_shard=16)
    assert cli(["fid-stats", str(shards), *w]) == 0
    out = capsys.readouterr().out
    _, fid_id = load_inception(standin_inception)
    path = stats_path(shards, fid_id)
    assert path.exists() and str(path) in out
    stats = FIDStats.load(path)
    assert stats.n == 40 and stats.feature_id == fid_id and stats.sigma.shape == (2048, 2048)
    assert cli(["fid-stats", str(shards), *w]) == 0
    assert "already exists" in capsys.readouterr().out

    # The same images as PNGs score ~0 against the shard statistics; other images do not.
    same = tmp_path / "same"
    same.mkdir()
    for key, img in read_samples(shards, load_manifest(shards), 40):
        Image.fromarray(img).save(same / f"{key}.png")
    res = tmp_path / "fid.json"
    assert cli(["fid", "--samples", str(same), "--ref", str(shards), "--json", str(res), *w]) == 0
    assert "FID-40:" in capsys.readouterr().out
    fid_same = json.loads(res.read_text())["fid"]

    other = shard_set(tmp_path, "other", count=40, gen_seed=5, samples_per_shard=40)
    other_png = tmp_path / "other_png"
    other_png.mkdir()
    for key, img in read_samples(other, load_manifest(other), 40):
        Image.fromarray(np.clip(img.astype(int) + 60, 0, 255).astype(np.uint8)).save(
            other_png / f"{key}.png")
    assert cli(["fid", "--samples", str(other_png), "--ref", str(path), "--json", str(res), *w]) == 0
    fid_other = json.loads(res.read_text())["fid"]
    # ~0 up to the round-off of 40 images in 2048 dimensions (a rank-deficient covariance)
    assert abs(fid_same) < 1e-3 * fid_other, (fid_same, fid_other)

    assert cli(["fid", "--samples", str(same), "--ref", str(shards), "--n", "50", *w]) == 2
    assert "holds 40 images but --n 50" in capsys.readouterr().err

    # JPEG-only shards take the other decode path.
    jpeg = shard_set(tmp_path, "jpeg", count=12, encoding="jpeg")
    assert cli(["fid-stats", str(jpeg), *w]) == 0
    assert FIDStats.load(stats_path(jpeg, fid_id)).n == 12


def test_fid_rejects_statistics_of_another_network(standin_inception, tmp_path, capsys):
    s = Accumulator(2048)
    s.add(np.random.default_rng(0).normal(size=(4, 2048)))
    npz = s.stats("inception-2015-12-05", "elsewhere").save(tmp_path / "ref.npz")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert cli(["fid", "--samples", str(folder), "--ref", str(npz),
                "--inception-weights", str(standin_inception)]) == 2
    assert "not comparable" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_training_fid_export_and_sampling_from_checkpoints(standin_inception, tmp_path):
    shards = shard_set(tmp_path, "data", count=24)
    run_dir = tmp_path / "run"
    r = run_train(shards, run_dir, "eval.fid_every=3", "eval.fid_samples=8", "eval.batch=4",
                  f"eval.inception_weights={standin_inception}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "computing reference statistics" in r.stdout
    assert len([ln for ln in r.stdout.splitlines() if ": FID-8 " in ln]) == 2  # steps 3 and 6
    assert list(shards.glob("fid_stats-inception-custom-*.npz"))

    # export CLI == EMA of the checkpoint: sampling either gives the same pixels
    assert cli(["export", str(run_dir), str(tmp_path / "export")]) == 0
    assert run(sample_cmd(run_dir, tmp_path / "from_ckpt")).returncode == 0
    assert run(sample_cmd(tmp_path / "export", tmp_path / "from_export")).returncode == 0
    a, b = pixels(tmp_path / "from_ckpt"), pixels(tmp_path / "from_export")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    r = run(sample_cmd(run_dir, tmp_path / "raw", "--weights", "raw"))
    assert r.returncode == 0, r.stderr
    assert "raw weights" in r.stdout
    raw = pixels(tmp_path / "raw")
    assert raw.keys() == a.keys() and any(not np.array_equal(raw[k], a[k]) for k in a)

    r = run(sample_cmd(tmp_path / "export", tmp_path / "x", "--weights", "raw"))
    assert r.returncode == 2 and "EMA weights only" in r.stderr

    # without --n/--steps/--eta, sampling follows the recipe's FID protocol (eval.*), recorded in
    # the checkpoint and in the export: here FID-8 with 4 DDIM steps (configs/test_tiny.yaml)
    for src in (run_dir, tmp_path / "export"):
        out = tmp_path / f"protocol-{src.name}"
        r = run([sys.executable, "-m", "maskdm", "sample", "--ckpt", str(src), "--out", str(out),
                 "--batch", "4"])
        assert r.returncode == 0, r.stderr
        assert "recipe's evaluation protocol for sampler, steps, eta, n" in r.stdout
        assert "with ddim 4 steps, eta 0.0" in r.stdout and len(list(out.glob("*.png"))) == 8

    r = run_train(shards, tmp_path / "run2", "eval.fid_every=3",
                  f"eval.inception_weights={tmp_path / 'missing.pth'}")
    assert r.returncode == 2
    assert "eval.fid_every=3 needs the FID Inception weights" in r.stderr
    assert WEIGHTS_FILE in r.stderr
    shutil.rmtree(tmp_path / "run2", ignore_errors=True)
