"""Bad inputs never stop the job and are never silently dropped; odd formats convert correctly."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdm.preprocessing.procedural import render
from maskdm.preprocessing.shard_job import ShardOptions, run
from maskdm.preprocessing.verify import verify
from maskdm.shardformat import haar
from maskdm.shardformat.manifest import load_manifest

SIZE = 32


def _png(w: int, h: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _samples(out: Path) -> dict[str, dict]:
    """src -> {"meta": json, "img": uint8 image} for every stored sample."""
    m = load_manifest(out)
    res = {}
    for s in m.shards:
        with tarfile.open(out / s.name) as tf:
            comps: dict[str, dict[str, bytes]] = {}
            for mem in tf:
                key, ext = mem.name.split(".", 1)
                comps.setdefault(key, {})[ext] = tf.extractfile(mem).read()
        for c in comps.values():
            meta = json.loads(c["json"])
            coeffs = np.frombuffer(c["dwt16"], "<f2").reshape(12, SIZE // 2, SIZE // 2)
            res[meta["src"]] = {"meta": meta, "img": haar.idwt_uint8(coeffs)}
    return res


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    src = tmp_path_factory.mktemp("messy")
    good = {}
    for i in range(6):  # non-square, larger than SIZE: exercise crop + downscale
        arr = render(1, i, 96)[:, 8:88]
        name = f"good/face{i}.{'jpg' if i % 2 else 'png'}"
        (src / "good").mkdir(exist_ok=True)
        Image.fromarray(arr).save(src / name)
        good[name] = arr
    face = Image.fromarray(render(1, 10, 64))
    full = _jpeg(face)
    bad = {
        "truncated.jpg": full[: len(full) // 2],
        "empty.jpg": b"",
        "notes.jpg": b"this is a text file, not a picture\n",
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
    (src / "cmyk.jpg").write_bytes(_jpeg(face.convert("CMYK")))
    (src / "gray.jpg").write_bytes(_jpeg(face.convert("L")))
    rgba = np.dstack([np.asarray(face), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    g16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(g16).save(src / "gray16.png")
    rgb16 = (np.random.default_rng(0).integers(0, 65536, (64, 64, 3))).astype(">u2")
    raw = b"".join(b"\0" + rgb16[r].tobytes() for r in range(64))
    (src / "rgb16.png").write_bytes(_png(64, 64, 16, 2, raw))
    face.convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png", transparency=0)
    Image.fromarray(render(1, 11, 28)).save(src / "small_upscaled.png")
    Image.fromarray(render(1, 12, 16)).save(src / "tiny.png")
    (src / "bomb.png").write_bytes(_png(100_000, 100_000, 8, 2, b"\0" * 100))
    os.symlink(src / "does-not-exist.jpg", src / "broken_link.jpg")
    os.mkfifo(src / "fifo.jpg")
    rotated = Image.fromarray(render(1, 13, 64)[:, 8:56])  # 48 wide, 64 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    (src / "exif_rotated.jpg").write_bytes(_jpeg(rotated, exif=exif))
    (src / "README.txt").write_text("not an image extension: ignored, not an input")
    unreadable = src / "unreadable.jpg"
    unreadable.write_bytes(full)
    os.chmod(unreadable, 0)
    as_root = os.access(unreadable, os.R_OK)

    out = tmp_path_factory.mktemp("out") / "shards"
    m = run(ShardOptions(src=str(src), out=str(out), source="folder", size=SIZE,
                         samples_per_shard=4, workers=2, min_side=24),
            progress=False, log=lambda *a: None)
    skipped = {json.loads(ln)["src"]: json.loads(ln)["reason"]
               for ln in (out / "skipped.jsonl").read_text().splitlines()}
    return {"src": src, "out": out, "manifest": m, "good": good, "skipped": skipped,
            "samples": _samples(out), "as_root": as_root}


@pytest.mark.parametrize("name,reason", [
    ("truncated.jpg", "truncated"),
    ("empty.jpg", "empty file"),
    ("notes.jpg", "not an image"),
    ("tiny.png", "too small"),
    ("bomb.png", "decompression bomb"),
    ("broken_link.jpg", "broken symlink"),
    ("fifo.jpg", "not a regular file"),
])
def test_bad_input_is_skipped_with_reason(messy, name, reason):
    assert name in messy["skipped"], f"{name} should be listed in skipped.jsonl"
    assert reason in messy["skipped"][name]
    assert name not in messy["samples"]


def test_unreadable_file(messy):
    if messy["as_root"]:
        assert "unreadable.jpg" in messy["samples"]  # root reads it: converted like any other
    else:
        assert "permission denied" in messy["skipped"]["unreadable.jpg"]


def test_good_images_all_present_and_correct(messy):
    from maskdm.preprocessing.images import prepare
    for name, arr in messy["good"].items():
        assert name in messy["samples"]
        data = (messy["src"] / name).read_bytes()
        expected = prepare(data, SIZE).image
        assert np.array_equal(messy["samples"][name]["img"], expected)
        assert messy["samples"][name]["meta"]["crop"] == [0.0, 8.0, 80.0, 88.0]


def test_counts_add_up(messy):
    m = messy["manifest"]
    src = m.source
    assert src["written"] + src["skipped"] == src["found"] == src["selected"]
    assert src["skipped"] == len(messy["skipped"])
    assert src["ignored"] == 1  # README.txt
    assert src["written"] == len(messy["samples"])
    assert verify(messy["out"], workers=1, progress=False).ok


def test_mode_conversions(messy):
    s = messy["samples"]
    gray = s["gray.jpg"]["img"].astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    cmyk = s["cmyk.jpg"]["img"].astype(int)
    ref = s["palette.png"]["img"].astype(int)  # the same face through another path
    assert np.abs(cmyk - ref).mean() < 12, "CMYK must convert to the right colours"
    rgba = s["rgba.png"]["img"]
    assert (rgba[:, :SIZE // 2 - 2] >= 250).all(), "transparent pixels composite over white"
    g16 = s["gray16.png"]["img"][..., 0].astype(int)
    assert g16.min() <= 5 and g16.max() >= 250, "16-bit range scales to 0..255, not clipped"
    assert s["rgb16.png"]["img"].std() > 30
    assert s["small_upscaled.png"]["meta"]["upscaled"] is True
    assert messy["manifest"].source["upscaled"] >= 1


def test_exif_orientation_applied(messy):
    meta = messy["samples"]["exif_rotated.jpg"]["meta"]
    assert meta["orig_size"] == [64, 48]  # displayed: wider than tall after the 90-degree turn


def test_zip_source_and_corrupt_member(tmp_path):
    zpath = tmp_path / "celebahq.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(render(2, i, 40)).save(buf, format="PNG")
            z.writestr(f"CelebA-HQ-img/{i}.png", buf.getvalue())
        z.writestr("CelebA-HQ-img/broken.jpg", b"\xff\xd8\xff garbage")
    out = tmp_path / "z"
    m = run(ShardOptions(src=str(zpath), out=str(out), source="celebahq", size=SIZE, workers=1),
            progress=False, log=lambda *a: None)
    assert m.source["written"] == 5 and m.source["skipped"] == 1
    assert verify(out, workers=1, progress=False).ok


def test_vggface2_labels_and_bboxes(tmp_path):
    root = tmp_path / "vgg"
    for ident in ("n000002", "n000001", "n000010"):
        d = root / "train" / ident
        d.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(render(3, hash((ident, j)) % 1000, 80)).save(d / f"000{j}_01.jpg")
    (root / "loose_bb_train.csv").write_text(
        "NAME_ID,X,Y,W,H\n\"n000001/0000_01\",10,12,40,50\n")
    out = tmp_path / "v"
    m = run(ShardOptions(src=str(root), out=str(out), source="vggface2", size=SIZE, workers=1,
                         bbox_csv=str(root / "loose_bb_train.csv")),
            progress=False, log=lambda *a: None)
    assert m.labels == {"n000001": 0, "n000002": 1, "n000010": 2}
    samples = _samples(out)
    assert len(samples) == 6
    for src, s in samples.items():
        ident = src.split("/")[1]
        assert s["meta"]["label"] == m.labels[ident] and s["meta"]["identity"] == ident
    boxed = samples["train/n000001/0000_01.jpg"]["meta"]["crop"]
    assert boxed == [5.0, 12.0, 55.0, 62.0]  # 50px square around the box centre (30, 37)


def test_bad_bbox_csv_is_a_clear_error(tmp_path):
    from maskdm.preprocessing.sources import SourceError
    root = tmp_path / "vgg" / "train" / "n000001"
    root.mkdir(parents=True)
    Image.fromarray(render(0, 0, 40)).save(root / "0001_01.jpg")
    bad = tmp_path / "bb.csv"
    bad.write_text("NAME_ID,X,Y,W,H\nn000001/0001_01,1,2,three,4\n")
    with pytest.raises(SourceError, match=r"bb.csv:2: X,Y,W,H must be numbers"):
        run(ShardOptions(src=str(tmp_path / "vgg"), out=str(tmp_path / "o"), source="vggface2",
                         size=SIZE, workers=1, bbox_csv=str(bad)), progress=False)


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_png_is_skipped_never_stored(tmp_path):
    """A PNG with damaged pixel data used to be sharded as a mostly black image: the EXIF lookup
    decoded it and swallowed the error, and the later load() 'succeeded' on the partial image."""
    from maskdm.preprocessing.images import Skip, prepare
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 64)[None, :, None], (64, 1, 3))
    good = (ramp + rng.integers(0, 20, (64, 64, 3))).clip(0, 255).astype(np.uint8)
    data = _png_bytes(good)
    idat = data.find(b"IDAT")
    cut = bytearray(data)
    for k in range(idat + 60, idat + 80):  # flip bytes inside the compressed pixel data
        cut[k] ^= 0xFF
    cut = bytes(cut)
    with pytest.raises(Skip, match="corrupt or truncated"):
        prepare(cut, 32)
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.png").write_bytes(data)
    (src / "cut.png").write_bytes(cut)
    m = run(ShardOptions(src=str(src), out=str(tmp_path / "out"), size=32, workers=1),
            progress=False)
    assert m.num_samples == 1
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").open()]
    assert [s["src"] for s in skipped] == ["cut.png"] and "corrupt" in skipped[0]["reason"]


def test_non_utf8_file_names_are_kept_and_recorded_losslessly(tmp_path):
    """Scraped datasets have file names that are not UTF-8: `fingerprint` used to crash on them
    (UnicodeEncodeError) before anything was written."""
    src = os.fsencode(tmp_path / "src\xe9")  # the source folder's own name is valid UTF-8
    os.mkdir(src)
    names = {b"ok.png": 1, b"latin1_caf\xe9.png": 2, b"bad\xff\xfe.png": 3}
    for name, seed in names.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(_png_bytes(render(seed, 0, 40)))
    with open(os.path.join(src, b"broken_\xff.jpg"), "wb") as f:
        f.write(b"not a picture")
    out = tmp_path / "out"
    m = run(ShardOptions(src=os.fsdecode(src), out=str(out), size=SIZE, workers=1),
            progress=False, log=lambda *a: None)
    assert m.num_samples == 3
    stored = _samples(out)
    raw = {bytes.fromhex(s["meta"]["src_hex"]) if "src_hex" in s["meta"]
           else s["meta"]["src"].encode() for s in stored.values()}
    assert raw == set(names)
    assert "bad\\xff\\xfe.png" in stored  # readable form, valid UTF-8
    for line in (out / "skipped.jsonl").read_bytes().splitlines():
        line.decode("utf-8")  # strict UTF-8, no lone surrogates
        rec = json.loads(line)
        assert bytes.fromhex(rec["src_hex"]) == b"broken_\xff.jpg"
        assert rec["src"] == "broken_\\xff.jpg" and "not an image" in rec["reason"]
    # each stored image is the one behind its name
    for name, seed in names.items():
        key = name.decode("utf-8", "backslashreplace")
        assert np.abs(stored[key]["img"].astype(int)
                      - np.asarray(Image.fromarray(render(seed, 0, 40)).resize(
                          (SIZE, SIZE), Image.BICUBIC)).astype(int)).mean() < 8
    assert verify(out).ok
    # resuming the same job enumerates the same names (fingerprint stable)
    m2 = run(ShardOptions(src=os.fsdecode(src), out=str(out), size=SIZE, workers=1),
             progress=False, log=lambda *a: None)
    assert m2.num_samples == 3


def test_empty_source_leaves_no_output_folder(tmp_path, capsys):
    from maskdm.pipeline.cli import main
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["shard", str(tmp_path / "empty"), str(out)]) != 0
    assert "no images found" in capsys.readouterr().err
    assert not out.exists()
    existing = tmp_path / "existing"  # a folder the user made is kept (as it was)
    existing.mkdir()
    assert main(["shard", str(tmp_path / "empty"), str(existing)]) != 0
    assert existing.is_dir()


@pytest.mark.parametrize("args,message", [
    (["shard", "procedural", "ftp://bucket/prefix", "--count", "4", "--size", "32"],
     "ftp:// locations are not supported"),
    (["shard", "--verify", "hdfs://nn/prefix"], "hdfs:// locations are not supported"),
    (["inspect", "file:///tmp/shards"], "file:// locations are not supported"),
    (["bench", "data", "ftp://bucket/prefix"], "ftp:// locations are not supported"),
    (["fid-stats", "ftp://bucket/prefix"], "ftp:// locations are not supported"),
    (["score", "--samples", "docs/img", "--ref", "ftp://bucket/prefix"],
     "ftp:// locations are not supported"),
    (["fid", "--samples", "s3://bucket/samples", "--ref", "docs/img"],
     "object storage is not supported here"),
    (["shard", "ftp://bucket/images", "out", "--count", "4", "--size", "32"],
     "ftp:// locations are not supported"),  # (a source in s3://, gs://, http(s):// is read)
    (["shard", "procedural", "https://example.com/x", "--count", "4", "--size", "32"],
     "https:// folders are read-only"),
    (["train", "--config", "configs/test_tiny.yaml", "--set", "data.shards=ftp://b/x",
      "--dry-run"], "ftp:// locations are not supported"),
    (["train", "--config", "configs/test_tiny.yaml", "--set", "data.shards=ftp://b/x"],
     "ftp:// locations are not supported"),
])
def test_unsupported_urls_are_refused_never_taken_as_paths(args, message, tmp_path, capsys,
                                                           monkeypatch):
    """s3://, gs:// and http(s):// shard folders are read (tests/test_object_storage.py); any other
    URL, or object storage where it is not read, is refused with a clear error, and nothing named
    `ftp:` or `s3:` appears in the working folder."""
    from maskdm.pipeline.cli import main
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    args = [str(root / a) if a.startswith(("configs/", "docs/")) else a for a in args]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_one_big_shard_uses_every_worker_and_gives_the_same_bytes(messy, tmp_path):
    """Fewer shards than workers (here one): the workers convert inputs of the same shard and
    the job writes it; the tar, its index, the manifest's shard records and skipped.jsonl are
    those of the one-process job."""
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run(ShardOptions(src=str(messy["src"]), out=str(out), source="folder", size=SIZE,
                         samples_per_shard=1000, workers=workers, min_side=24),
            progress=False, log=lambda *a: None)
        outs[workers] = out
    a, b = outs[1], outs[2]
    for name in ("shard-000000.tar", "shard-000000.idx", "skipped.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert load_manifest(a).shards == load_manifest(b).shards
    assert json.loads((a / "skipped.jsonl").read_text().splitlines()[0])["reason"]
