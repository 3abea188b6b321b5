"""Shard format invariants: lossless round trip, manifest == tar contents, checksums, --verify."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdm.preprocessing.shard_job import ShardJobError, ShardOptions, run
from maskdm.preprocessing.verify import verify
from maskdm.shardformat import haar
from maskdm.shardformat.manifest import load_manifest
from maskdm.shardformat.tarfmt import parse_index, scan_tar
from tests.conftest import noise_image, shard_set


def _inverse_haar_reference(c: np.ndarray) -> np.ndarray:
    """Independent inverse of the stored layout: [12, h, w] -> [2h, 2w, 3] (plain numpy)."""
    c = c.astype(np.float64)
    ll, dh, dv, dd = c[0:3], c[3:6], c[6:9], c[9:12]
    a = (ll + dh + dv + dd) / 2
    b = (ll + dh - dv - dd) / 2
    cc = (ll - dh + dv - dd) / 2
    d = (ll - dh - dv + dd) / 2
    h, w = ll.shape[1:]
    out = np.empty((3, 2 * h, 2 * w))
    out[:, 0::2, 0::2], out[:, 0::2, 1::2] = a, b
    out[:, 1::2, 0::2], out[:, 1::2, 1::2] = cc, d
    return out.transpose(1, 2, 0)


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_lossless_round_trip_every_pixel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    originals = {}
    for i in range(12):
        img = noise_image(i, 48, 48)
        Image.fromarray(img).save(src / f"img{i:02d}.png")
        originals[f"img{i:02d}.png"] = img
    out = tmp_path / "out"
    run(ShardOptions(src=str(src), out=str(out), source="folder", size=48, samples_per_shard=5,
                     workers=1), progress=False, log=lambda *a: None)
    m = load_manifest(out)
    seen = 0
    for shard in m.shards:
        for key, comps in _tar_samples(out / shard.name).items():
            meta = json.loads(comps["json"])
            coeffs = np.frombuffer(comps["dwt16"], dtype="<f2").reshape(12, 24, 24)
            rec = _inverse_haar_reference(coeffs)
            assert np.array_equal(rec, np.rint(rec)), "inverse must be integral"
            assert np.array_equal(rec.astype(np.uint8), originals[meta["src"]]), meta["src"]
            seen += 1
    assert seen == 12


def test_float16_exact_on_extreme_images():
    for img in (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8),
                np.tile(np.array([[0, 255], [255, 0]], np.uint8)[..., None], (4, 4, 3))):
        c = haar.dwt_uint8(img)
        assert np.array_equal(haar.idwt_uint8(c), img)
        assert np.abs(c.astype(np.float32)).max() <= 510


def test_haar_matches_closed_form_and_model_space():
    img = noise_image(7, 16, 16)
    c = haar.dwt_uint8(img).astype(np.float64)
    x = img.astype(np.float64).transpose(2, 0, 1)
    a, b, cc, d = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    assert np.array_equal(c[0:3], (a + b + cc + d) / 2)
    assert np.array_equal(c[6:9], (a - b + cc - d) / 2)
    # model space == Haar of the [-1, 1] image with 1/4 normalisation
    y = x / 127.5 - 1
    ya, yb, yc, yd = y[:, 0::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 0::2], y[:, 1::2, 1::2]
    ms = haar.to_model_space(c.astype(np.float16))
    assert np.allclose(ms[0:3], (ya + yb + yc + yd) / 4, atol=1e-6)
    assert np.allclose(ms[9:12], (ya - yb - yc + yd) / 4, atol=1e-6)


def test_integer_haar_equals_pywavelets_and_its_moments_are_exact():
    """The integer Haar gives pywavelets' values (rounded to the exact 0.5 grid) on every kind of
    image, as float16 with no negative zero; the moments match a float64 reference."""
    import pywt
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(4)]
    images += [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8),
               noise_image(5, 32, 32)]
    images[1][..., 1] = 255  # a constant channel: pywavelets gives -0.0 in its detail bands
    for img in images:
        c = haar.dwt_uint8(img)
        ll, (dh, dv, dd) = pywt.dwt2(img.transpose(2, 0, 1).astype(np.float64), "haar",
                                     axes=(-2, -1))
        ref = np.rint(np.concatenate([ll, dh, dv, dd]) * 2.0) * 0.5
        assert c.dtype == np.float16 and c.shape == (12, img.shape[0] // 2, img.shape[1] // 2)
        assert np.array_equal(c.astype(np.float64), ref)
        assert not (c.view(np.uint16) == 0x8000).any()  # a zero is +0.0
        m = (c.astype(np.float64) / 255.0 + haar.MODEL_OFFSET[:, None, None]).reshape(12, -1)
        s, sq = haar.channel_moments(c)
        assert np.allclose(s, m.sum(axis=1), rtol=1e-9, atol=1e-6)
        assert np.allclose(sq, (m * m).sum(axis=1), rtol=1e-9, atol=1e-6)
        c2, s2, sq2 = haar.dwt_uint8_with_moments(img)
        assert np.array_equal(c2.view(np.uint16), c.view(np.uint16))
        assert np.array_equal(s2, s) and np.array_equal(sq2, sq)
        assert all(np.array_equal(a, b) for a, b in zip(haar.image_moments(img), (s, sq)))


def test_verify_accepts_a_negative_zero_from_older_shards(tmp_path):
    """Shards written before the integer Haar may hold -0.0 where the value is 0: still valid."""
    shards = shard_set(tmp_path / "s", "v", count=6, samples_per_shard=6)
    m = load_manifest(shards)
    tar = shards / m.shards[0].name
    entry = parse_index((shards / m.shards[0].index).read_text())[0]
    comp = next(c for c in entry if c.ext == "dwt16")
    data = bytearray(tar.read_bytes())
    coeffs = np.frombuffer(bytes(data[comp.offset:comp.offset + comp.size]), "<f2").copy()
    zeros = np.flatnonzero(coeffs[coeffs.size // 4:] == 0) + coeffs.size // 4  # detail bands
    assert zeros.size
    coeffs[zeros[0]] = np.float16(-0.0)
    data[comp.offset:comp.offset + comp.size] = coeffs.tobytes()
    tar.write_bytes(bytes(data))
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (shards / "manifest.json").write_text(json.dumps(manifest))
    report = verify(shards, workers=1, progress=False)
    assert report.ok, report.problems


def test_dwt_domain_flip_equals_dwt_of_flipped_image():
    img = noise_image(3, 16, 16)
    c = haar.dwt_uint8(img).astype(np.float32)
    flipped = c[:, :, ::-1] * haar.FLIP_SIGN[:, None, None]
    assert np.array_equal(flipped, haar.dwt_uint8(img[:, ::-1].copy()).astype(np.float32))


def test_manifest_counts_checksums_and_index_match_tars(tmp_path):
    out = shard_set(tmp_path, "s", count=70, samples_per_shard=30, keep_jpeg=True)
    m = load_manifest(out)
    assert [s.samples for s in m.shards] == [30, 30, 10]
    assert m.num_samples == m.source["written"] == 70
    keys = set()
    for shard in m.shards:
        data = (out / shard.name).read_bytes()
        assert len(data) == shard.bytes
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        samples = _tar_samples(out / shard.name)
        assert len(samples) == shard.samples
        assert all(set(c) == {"dwt16", "jpg", "json"} for c in samples.values())
        assert parse_index((out / shard.index).read_text()) == scan_tar(out / shard.name)
        keys |= set(samples)
    assert len(keys) == 70
    assert len(m.channel_mean) == len(m.channel_std) == 12
    assert verify(out, workers=1, progress=False).ok


def test_webdataset_library_reads_the_shards(demo_shards):
    import webdataset as wds
    m = load_manifest(demo_shards)
    urls = [str(demo_shards / s.name) for s in m.shards]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert len(sample["dwt16"]) == 12 * 16 * 16 * 2
        n += 1
    assert n == m.num_samples


def test_channel_stats_match_a_direct_computation(demo_shards):
    m = load_manifest(demo_shards)
    xs = []
    for shard in m.shards:
        for comps in _tar_samples(demo_shards / shard.name).values():
            xs.append(haar.to_model_space(np.frombuffer(comps["dwt16"], "<f2").reshape(12, 16, 16)))
    x = np.stack(xs).astype(np.float64)
    assert np.allclose(m.channel_mean, x.mean(axis=(0, 2, 3)), atol=2e-6)
    assert np.allclose(m.channel_std, x.std(axis=(0, 2, 3)), atol=2e-6)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "missing_index", "bad_index",
                                    "missing_shard"])
def test_verify_catches_damage(tmp_path, damage):
    out = shard_set(tmp_path, "s", count=40, samples_per_shard=20)
    m = load_manifest(out)
    tar = out / m.shards[1].name
    if damage == "flip_byte":
        data = bytearray(tar.read_bytes())
        data[len(data) // 2] ^= 0x10
        tar.write_bytes(bytes(data))
    elif damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:5000])
    elif damage == "missing_index":
        (out / m.shards[1].index).unlink()
    elif damage == "bad_index":
        idx = out / m.shards[1].index
        idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    else:
        tar.unlink()
    report = verify(out, workers=1, progress=False)
    assert not report.ok
    assert any(m.shards[1].name in p or m.shards[1].index in p for p in report.problems)


def test_verify_cli_exit_code_and_report(tmp_path, capsys):
    from maskdm.pipeline.cli import main
    out = shard_set(tmp_path, "s", count=30, samples_per_shard=15)
    assert main(["shard", "--verify", str(out), "--quiet"]) == 0
    tar = out / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["shard", "--verify", str(out), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "DAMAGED" in text and "shard-000000.tar: sha256 mismatch" in text


def test_verify_detects_damage_that_keeps_the_checksum_story_consistent(tmp_path):
    """A flipped coefficient with a re-computed manifest checksum still fails the lossless check."""
    out = shard_set(tmp_path, "s", count=10, samples_per_shard=10)
    m = load_manifest(out)
    shard = m.shards[0]
    tar = out / shard.name
    entry = parse_index((out / shard.index).read_text())[3]
    dwt = next(c for c in entry if c.ext == "dwt16")
    data = bytearray(tar.read_bytes())
    data[dwt.offset + 100] ^= 0x01  # lowest mantissa bit of one float16: leaves the 0.5 grid
    tar.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify(out, workers=1, progress=False)
    assert not report.ok and any("NotLossless" in p for p in report.problems)


def test_subsets_are_deterministic_and_nested(tmp_path):
    def srcs(out):
        m = load_manifest(out)
        return {json.loads(c["json"])["src"] for s in m.shards
                for c in _tar_samples(out / s.name).values()}
    a = srcs(shard_set(tmp_path, "a", count=200, subset=0.1, seed=3))
    b = srcs(shard_set(tmp_path, "b", count=200, subset=0.1, seed=3))
    big = srcs(shard_set(tmp_path, "c", count=200, subset=0.5, seed=3))
    other = srcs(shard_set(tmp_path, "d", count=200, subset=0.1, seed=4))
    assert a == b and len(a) == 20
    assert a < big and len(big) == 100
    assert a != other
    assert load_manifest(tmp_path / "a").subset == {"fraction": 0.1, "seed": 3}


def test_rerun_is_a_no_op_and_a_different_job_is_refused(tmp_path):
    out = shard_set(tmp_path, "s")
    before = (out / "manifest.json").read_text()
    shard_set(tmp_path, "s")  # same arguments: nothing to do
    assert (out / "manifest.json").read_text() == before
    with pytest.raises(ShardJobError, match="different sharding job"):
        shard_set(tmp_path, "s", size=16)
    shard_set(tmp_path, "s", size=16, overwrite=True)
    assert load_manifest(out).image_size == 16


def test_jpeg_encoding(tmp_path):
    out = shard_set(tmp_path, "j", encoding="jpeg", count=20, samples_per_shard=10)
    m = load_manifest(out)
    assert m.encoding == "jpeg" and m.components == ["jpg", "json"]
    comps = next(iter(_tar_samples(out / m.shards[0].name).values()))
    img = Image.open(io.BytesIO(comps["jpg"]))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert verify(out, workers=1, progress=False).ok


def test_size_must_be_even(tmp_path):
    with pytest.raises(ShardJobError, match="multiple of 2"):
        shard_set(tmp_path, "odd", size=33)
