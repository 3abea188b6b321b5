"""The peer benchmark's mechanics on a few dozen images (benchmarks/peers.py): every writer stores
the same images (the same JPEG bytes, checked by content hash; maskdm's dwt16 shards the same
pixels losslessly), and every reader delivers the model-ready batch of the same shape. Timings are
never asserted. MosaicML streaming and LitData need torchvision (and so a torch that matches it):
where they are not installed their rows are skipped, saying so."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("webdataset", reason="needs webdataset (the dev extra)")


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _formats() -> list[str]:
    from benchmarks.peers import FORMATS
    out = []
    for f in FORMATS:
        if f == "mds" and not _have("streaming"):
            continue
        if f == "litdata" and not _have("litdata"):
            continue
        out.append(f)
    return out


def _stored_jpegs(fmt: str, path) -> set[str]:
    """sha256 of every stored JPEG, read back through the format's own library or reader."""
    if fmt == "maskdm-jpeg":
        from maskdm.shardformat.reader import ShardReader
        r = ShardReader(path)
        return {hashlib.sha256(r.read_at(s, j)[1]["jpg"]).hexdigest()
                for s, n in enumerate(r.order_sizes) for j in range(n)}
    if fmt == "webdataset":
        import webdataset as wds
        urls = sorted(str(p) for p in path.glob("*.tar"))
        return {hashlib.sha256(s["jpg"]).hexdigest() for s in wds.WebDataset(urls,
                                                                              shardshuffle=False)}
    if fmt == "mds":
        from streaming import StreamingDataset
        ds = StreamingDataset(local=str(path), shuffle=False)
        return {hashlib.sha256(ds[i]["jpg"]).hexdigest() for i in range(len(ds))}
    from litdata import StreamingDataset
    ds = StreamingDataset(str(path))
    return {hashlib.sha256(ds[i]["jpg"]).hexdigest() for i in range(len(ds))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """24 photos (varied sizes, EXIF rotations) written by every writer installed here."""
    from benchmarks.peers import make_sources, write_all
    tmp = tmp_path_factory.mktemp("peers")
    src = make_sources("photos", 24, tmp / "src")
    return src, tmp / "shards", write_all(src, tmp / "shards", 1, 8)


ALL = ("maskdm-dwt16", "maskdm-jpeg", "webdataset", "mds", "litdata")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ALL)
def test_each_format_stores_the_same_images_and_reads_to_the_model_ready_batch(written, fmt):
    if fmt not in _formats():
        pytest.skip(f"{fmt}: its library is not installed here (MosaicML streaming and LitData "
                    f"need torchvision, and so a torch that matches it)")
    from benchmarks.peers import _prepared_jpeg
    src, shards, writes = written
    assert "error" not in writes[fmt], writes[fmt]
    if fmt == "maskdm-dwt16":  # the prepared pixels themselves (lossless), not their JPEG
        from maskdm.preprocessing.images import prepare, read_file
        from maskdm.shardformat import haar
        from maskdm.shardformat.reader import ShardReader
        r = ShardReader(shards / fmt)
        stored = {hashlib.sha256(haar.idwt_uint8(haar.decode_dwt16(
            r.read_at(s, j)[1]["dwt16"], 256)).tobytes()).hexdigest()
            for s, n in enumerate(r.order_sizes) for j in range(n)}
        assert stored == {hashlib.sha256(prepare(read_file(str(p)), 256).image.tobytes())
                          .hexdigest() for p in src.glob("*.jpg")}
    else:
        want = {hashlib.sha256(_prepared_jpeg(str(p))[1]).hexdigest() for p in src.glob("*.jpg")}
        assert len(want) == 24 and _stored_jpegs(fmt, shards / fmt) == want
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.peers", "read", fmt, str(shards / fmt),
           "--output", "dwt", "--workers", "1", "--batch", "4", "--batches", "2"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["shape"] == [12, 128, 128] and row["img_s"] > 0, row
    assert row["resume"] in ("exact", "differs", "none (restarts the epoch)"), row
    if fmt.startswith("maskdm"):
        assert row["resume"] == "exact"


def test_the_model_ready_batch_of_a_peer_equals_maskdm_s_on_the_same_image():
    """The peers' per-sample work (decode, flip, Haar, model space) gives maskdm's own transform
    of the same pixels: the comparison is of the same output."""
    import torch

    from benchmarks.peers import model_sample
    from maskdm.pipeline.data.transform import to_model_space
    from maskdm.preprocessing.images import encode_jpeg
    from maskdm.preprocessing.procedural import render
    img = render(1, 0, 64)
    jpg = encode_jpeg(img, 95)
    from maskdm.preprocessing.images import decode_jpeg
    pixels = torch.from_numpy(decode_jpeg(jpg).copy())[None]
    for key in ("a", "b", "c", "d"):
        from benchmarks.peers import _flip
        flips = torch.tensor([_flip(key)])
        for space in ("dwt", "pixel"):
            ours = to_model_space(pixels, "jpeg", flips, space, torch.device("cpu"))[0]
            theirs = model_sample(jpg, key, space)
            assert torch.allclose(ours, theirs, atol=1e-5), (key, space)
    assert len({_flip(k) for k in "abcdefgh"}) == 2
