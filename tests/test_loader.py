"""Loaders: exact resume, torch == DALI (CPU mode), flips, normalisation, damaged data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdm.model import dwt as tdwt
from maskdm.pipeline.data.loader import Loader
from maskdm.shardformat import haar
from maskdm.shardformat.manifest import load_manifest
from maskdm.shardformat.reader import SampleError
from maskdm.shardformat.tarfmt import format_index, parse_index
from tests.conftest import shard_set


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


needs_dali = pytest.mark.skipif(not _has_dali(), reason="nvidia-dali is not installed")


@pytest.fixture(scope="module")
def dwt_set(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("d"), "dwt", count=70, samples_per_shard=16)


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("j"), "jpeg", count=45, samples_per_shard=10,
                     encoding="jpeg")


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys
        assert torch.equal(x.x0, y.x0)
        assert (x.flips is None) == (y.flips is None)
        assert x.flips is None or torch.equal(x.flips, y.flips)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_restore_from_state_yields_exactly_the_remaining_batches(dwt_set, backend):
    kw = dict(global_batch=6, seed=5, backend=backend, workers=2)
    full = _take(Loader(dwt_set, **kw), 30)  # 180 samples: more than two epochs of 70
    first = Loader(dwt_set, **kw)
    _take(first, 11)
    state = first.state_dict()
    assert state == {"seed": 5, "samples_seen": 66, "global_batch": 6, "partitions": 2, "window": 8}
    resumed = Loader(dwt_set, **kw)
    resumed.load_state_dict(state)
    _same(_take(resumed, 19), full[11:])


@needs_dali
@pytest.mark.parametrize("which", ["dwt", "jpeg"])
def test_dali_cpu_and_torch_backends_are_identical(dwt_set, jpeg_set, which):
    shards = dwt_set if which == "dwt" else jpeg_set
    kw = dict(global_batch=4, seed=2, world_size=2, rank=1, hflip=True)
    a = _take(Loader(shards, backend="torch", workers=2, **kw), 25)
    b = _take(Loader(shards, backend="dali", **kw), 25)
    _same(a, b)


def test_workers_do_not_change_the_batches(dwt_set):
    a = _take(Loader(dwt_set, global_batch=5, workers=0), 9)
    b = _take(Loader(dwt_set, global_batch=5, workers=2), 9)
    _same(a, b)


@pytest.mark.parametrize("which", ["dwt", "jpeg"])
@pytest.mark.parametrize("space", ["dwt", "pixel"])
def test_cpu_workers_convert_exactly_as_the_device_does(dwt_set, jpeg_set, tmp_path, which,
                                                        space):
    """On the CPU the workers convert each sample to model space as they read it; on a GPU the
    device converts whole batches. Both give the same values to the bit, damaged samples and
    their replacements (which take their own slot's flip) included."""
    from maskdm.pipeline.data.torch_loader import RankStream
    from maskdm.pipeline.data.transform import to_model_space
    from maskdm.shardformat.reader import ShardReader
    shards = _copy(dwt_set if which == "dwt" else jpeg_set, tmp_path)
    if which == "dwt":
        _edit_index(shards, 1, lambda e: [c for c in e if c.ext != "dwt16"])
    else:
        m = load_manifest(shards)
        entry = parse_index((shards / m.shards[1].index).read_text())[0]
        jpg = next(c for c in entry if c.ext == "jpg")
        data = bytearray((shards / m.shards[1].name).read_bytes())
        data[jpg.offset:jpg.offset + 4] = b"\0\0\0\0"
        (shards / m.shards[1].name).write_bytes(bytes(data))
    n_batches = -(-load_manifest(shards).num_samples // 6)
    flipped_replacement = False
    for seed in range(8):  # until a replacement has taken a flip its source did not have
        loader = Loader(shards, global_batch=6, seed=seed, workers=2, space=space)
        got = _take(loader, n_batches)
        assert loader.skipped_samples == 1
        stream = RankStream(ShardReader(shards), order=loader.order, start=0, global_batch=6,
                            rank=0, world_size=1, hflip=True, strict=False)  # no space: GPU path
        order = stream.order()
        for k, b in enumerate(got):
            raw = stream.load(k, order)
            assert not raw["model_space"] and raw["keys"] == b.keys
            want = to_model_space(raw["data"], raw_encoding(shards), raw["flips"], space,
                                  torch.device("cpu"))
            assert b.x0.dtype == torch.float32
            assert torch.equal(b.x0.view(torch.int32), want.view(torch.int32))  # to the bit
            twins = [(i, j) for i in range(6) for j in range(i) if b.keys[i] == b.keys[j]]
            flipped_replacement |= any(bool(b.flips[i] != b.flips[j]) for i, j in twins)
        if flipped_replacement:
            break
    assert flipped_replacement


def raw_encoding(shards: Path) -> str:
    return load_manifest(shards).encoding


def test_ranks_partition_an_epoch_end_to_end(dwt_set):
    n = load_manifest(dwt_set).num_samples  # 70
    world, gb = 2, 10
    keys = []
    for rank in range(world):
        loader = Loader(dwt_set, global_batch=gb, rank=rank, world_size=world, workers=2)
        for k, batch in enumerate(_take(loader, n // gb)):
            keys.extend((k, rank, key) for key in batch.keys)
    keys.sort()  # stream order: batch, then rank
    assert sorted(key for _, _, key in keys) == sorted({key for _, _, key in keys})
    assert len({key for _, _, key in keys}) == n


def test_normalisation_matches_the_manifest_definition(dwt_set):
    batch = _take(Loader(dwt_set, global_batch=4, hflip=False, workers=0), 1)[0]
    m = load_manifest(dwt_set)
    by_key = {}
    for shard in m.shards:
        with open(dwt_set / shard.name, "rb") as f:
            for entry in parse_index((dwt_set / shard.index).read_text()):
                c = next(c for c in entry if c.ext == "dwt16")
                f.seek(c.offset)
                by_key[entry[0].name.split(".")[0]] = f.read(c.size)
    for key, x in zip(batch.keys, batch.x0):
        coeffs = haar.decode_dwt16(by_key[key], m.image_size)
        assert torch.equal(x, torch.from_numpy(haar.to_model_space(coeffs)))
    xs = torch.cat([b.x0 for b in _take(Loader(dwt_set, global_batch=7, hflip=False, workers=0), 10)])
    assert np.allclose(xs.mean(dim=(0, 2, 3)).numpy(), m.channel_mean, atol=1e-4)


def test_flip_in_the_dwt_domain_is_the_dwt_of_the_flipped_image(dwt_set):
    on = _take(Loader(dwt_set, global_batch=8, hflip=True, seed=1, workers=0), 4)
    off = _take(Loader(dwt_set, global_batch=8, hflip=False, seed=1, workers=0), 4)
    flipped = 0
    for a, b in zip(on, off):
        assert a.keys == b.keys and b.flips is None
        for xa, xb, flag in zip(a.x0, b.x0, a.flips.tolist()):  # the batch says which it flipped
            assert flag == (not torch.equal(xa, xb))  # (the flip conditioning's input)
            if not flag:
                continue
            img = tdwt.image_from_model(xb[None])  # unflipped uint8 image
            assert torch.equal(xa[None], tdwt.model_from_image(img.flip(-1)))
            flipped += 1
    assert 5 < flipped < 27


def test_pixel_space(dwt_set):
    px = _take(Loader(dwt_set, global_batch=4, hflip=False, space="pixel", workers=0), 1)[0]
    dw = _take(Loader(dwt_set, global_batch=4, hflip=False, workers=0), 1)[0]
    assert px.x0.shape == (4, 3, 32, 32)
    img = tdwt.image_from_model(dw.x0)
    assert torch.allclose(px.x0, tdwt.pixels_from_image(img), atol=1e-5)


def test_labels_flow_through(tmp_path):
    from PIL import Image

    from maskdm.preprocessing.procedural import render
    from maskdm.preprocessing.shard_job import ShardOptions, run
    for ident in ("a", "b"):
        d = tmp_path / "vgg" / "train" / ident
        d.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(render(0, j + (10 if ident == "b" else 0), 32)).save(d / f"{j}.png")
    out = tmp_path / "shards"
    run(ShardOptions(src=str(tmp_path / "vgg"), out=str(out), source="vggface2", size=32,
                     workers=1), progress=False, log=lambda *a: None)
    batch = _take(Loader(out, global_batch=6, workers=0), 1)[0]
    for key, label in zip(batch.keys, batch.labels.tolist()):
        assert label in (0, 1)
    assert sorted(batch.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_bad_batch_configs(dwt_set):
    with pytest.raises(ValueError, match="multiple of the world size"):
        Loader(dwt_set, global_batch=5, world_size=2)
    with pytest.raises(ValueError, match="data.backend"):
        Loader(dwt_set, global_batch=4, backend="tf")


def test_a_state_from_before_partitions_continues_the_order_it_was_written_with(dwt_set):
    """A 0.2 checkpoint's loader state has no partitions/window: the loader continues with one
    partition and a window of one shard (the 0.2 order), not with today's default."""
    from maskdm.pipeline.data.order import OrderError
    old = _take(Loader(dwt_set, global_batch=6, seed=3, partitions=1, window=1), 20)
    resumed = Loader(dwt_set, global_batch=6, seed=3)  # the defaults: 2 partitions, window 8
    assert resumed.partitions == 2
    resumed.load_state_dict({"seed": 3, "samples_seen": 42, "global_batch": 6})
    assert (resumed.partitions, resumed.window) == (1, 1)
    _same(_take(resumed, 13), old[7:])
    explicit = Loader(dwt_set, global_batch=6, seed=3, partitions=2)
    with pytest.raises(OrderError, match=r"data.partitions is 2 but the checkpoint's data order "
                                         r"was written with 1 \(a checkpoint of maskdm < 0.3"):
        explicit.load_state_dict({"seed": 3, "samples_seen": 42, "global_batch": 6})
    now = Loader(dwt_set, global_batch=6, seed=3, window=2)
    with pytest.raises(OrderError, match="data.shuffle_window is 2 but .* written with 8"):
        now.load_state_dict({"seed": 3, "samples_seen": 42, "global_batch": 6, "partitions": 2,
                             "window": 8})


@needs_dali
def test_dali_decodes_partitioned_batches_in_stream_order_with_one_pipeline(dwt_set):
    """Batches that mix shards reach DALI in stream order, and one pipeline serves the whole
    run: until 0.3 DALI's reader was rebuilt every few batches (its per-segment index files)."""
    kw = dict(global_batch=8, seed=4, partitions=2, window=3)
    torch_b = _take(Loader(dwt_set, backend="torch", workers=0, **kw), 30)
    loader = Loader(dwt_set, backend="dali", **kw)
    dali_b = [next(loader) for _ in range(30)]  # 240 samples: more than three epochs of 70
    assert loader._dali.builds == 1
    loader.close()
    _same(dali_b, torch_b)
    order = loader.order  # the batches interleave shards
    shards = order.locate(order.ids_at(np.arange(12 * 8)))[0].reshape(12, 8)
    runs = [sum(1 for i in range(8) if i == 0 or row[i] != row[i - 1]) for row in shards]
    assert max(r - len(set(row)) for r, row in zip(runs, shards.tolist())) > 0


# ----------------------------------------------------------------------------- damaged data

def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_index(shards: Path, shard: int, fn) -> str:
    """Apply ``fn`` to the component list of sample 0 of ``shard``; returns its key."""
    m = load_manifest(shards)
    idx = shards / m.shards[shard].index
    samples = parse_index(idx.read_text())
    samples[0] = fn(samples[0])
    idx.write_text(format_index(samples))
    return samples[0][0].name.split(".")[0] if samples[0] else ""


def _run_epoch(shards, backend="torch", strict=False):
    loader = Loader(shards, global_batch=10, backend=backend, workers=2, strict=strict)
    n = load_manifest(shards).num_samples
    batches = _take(loader, -(-n // 10))
    return loader, batches


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("damage", ["missing_component", "wrong_size"])
def test_damaged_dwt_samples_are_replaced_and_counted(dwt_set, tmp_path, backend, damage):
    shards = _copy(dwt_set, tmp_path)
    if damage == "missing_component":
        _edit_index(shards, 1, lambda e: [c for c in e if c.ext != "dwt16"])
    else:
        from maskdm.shardformat.tarfmt import Component
        _edit_index(shards, 1, lambda e: [Component(c.ext, c.offset, c.size - 2, c.name)
                                          if c.ext == "dwt16" else c for c in e])
    loader, batches = _run_epoch(shards, backend)
    assert loader.skipped_samples == 1
    for b in batches:
        assert torch.isfinite(b.x0).all() and b.x0.shape == (10, 12, 16, 16)
        assert None not in b.keys
    with pytest.raises(SampleError):
        _run_epoch(shards, backend, strict=True)


def _shard_keys(shards: Path, shard: int) -> set[str]:
    m = load_manifest(shards)
    return {e[0].name.split(".")[0] for e in parse_index((shards / m.shards[shard].index).read_text())}


def _damaged_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
            and ("damaged" in r.getMessage())]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("damage,reason", [
    ("truncated_tar", "truncated"),
    ("garbage_index", "not a DALI index: binary data"),
    ("index_of_another_shard", "lists 6 samples, the manifest 16"),
])
def test_a_damaged_shard_is_left_out_for_everyone(dwt_set, tmp_path, caplog, backend, damage,
                                                  reason):
    """A truncated tar or a garbage index used to damage whole batches (consecutive positions
    lie in one shard) and stop the run; now the shard is left out of the order when the loader
    opens, with one line saying why, and training goes on with the other shards."""
    shards = _copy(dwt_set, tmp_path)
    m = load_manifest(shards)
    tar, idx = shards / m.shards[2].name, shards / m.shards[2].index
    if damage == "truncated_tar":
        tar.write_bytes(tar.read_bytes()[:20_000])
    elif damage == "garbage_index":
        idx.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        shutil.copy(shards / m.shards[4].index, idx)
    caplog.set_level("WARNING", logger="maskdm.data")
    loader, batches = _run_epoch(shards, backend)
    assert list(loader.reader.excluded) == [m.shards[2].name]
    assert reason in loader.reader.excluded[m.shards[2].name]
    assert loader.reader.num_samples == m.num_samples - 16 and loader.skipped_samples == 0
    assert not _shard_keys(dwt_set, 2) & {k for b in batches for k in b.keys}
    lines = _damaged_lines(caplog)
    stem = m.shards[2].name.removesuffix(".tar")  # the message names the tar or its index
    assert len(lines) == 1 and stem in lines[0] and "16 of 70 samples" in lines[0]
    with pytest.raises(SampleError, match=f"{stem}.*data.strict"):
        Loader(shards, global_batch=10, backend=backend, strict=True)


def test_verify_explains_a_garbage_index_in_words(dwt_set, tmp_path):
    from maskdm.preprocessing.verify import verify
    shards = _copy(dwt_set, tmp_path)
    m = load_manifest(shards)
    (shards / m.shards[1].index).write_bytes(b"v1.2 16\n\xff\xfe garbage \x00\x01")
    report = verify(shards, quick=True, progress=False)
    assert any(p.startswith(f"{m.shards[1].index}: not a DALI index: binary data")
               for p in report.problems), report.problems
    assert not any("codec" in p for p in report.problems)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_a_shard_found_damaged_while_training_is_replaced_from_other_shards(dwt_set, tmp_path,
                                                                             caplog, backend):
    """Damage the quick start-up check cannot see (a bad line inside the index) makes every
    sample of the shard unreadable, so whole batches; they are taken from elsewhere in the
    stream, counted, and reported in one line."""
    shards = _copy(dwt_set, tmp_path)
    m = load_manifest(shards)
    idx = shards / m.shards[1].index
    lines = idx.read_text().splitlines()
    lines[5] = "this line is not an index entry"
    idx.write_text("\n".join(lines) + "\n")
    caplog.set_level("WARNING", logger="maskdm.data")
    kw = dict(global_batch=4, backend=backend, workers=2, seed=3)
    loader = Loader(shards, **kw)
    batches = _take(loader, 70 // 4 * 2)  # two epochs
    assert not loader.reader.excluded
    assert 16 <= loader.skipped_samples <= 32 and loader.damaged_shards == {
        m.shards[1].name: loader.skipped_samples}
    assert not _shard_keys(dwt_set, 1) & {k for b in batches for k in b.keys}
    assert all(None not in b.keys and torch.isfinite(b.x0).all() for b in batches)
    lines = _damaged_lines(caplog)
    assert len(lines) == 1 and "line 6" in lines[0], lines
    if backend == "dali":
        _same(batches, _take(Loader(shards, **{**kw, "backend": "torch"}), len(batches)))


def _damage_values(shards: Path, shard: int, sample: int, channel: int, value) -> str:
    """Overwrite one coefficient of a stored dwt16 tensor in place (same size, same index)."""
    m = load_manifest(shards)
    entry = parse_index((shards / m.shards[shard].index).read_text())[sample]
    c = next(c for c in entry if c.ext == "dwt16")
    tar = shards / m.shards[shard].name
    data = bytearray(tar.read_bytes())
    at = c.offset + 2 * (channel * 16 * 16 + 37)
    data[at:at + 2] = np.array([value], "<f2").tobytes()
    tar.write_bytes(bytes(data))
    return entry[0].name.split(".")[0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("channel,value", [
    (4, np.nan), (0, np.inf), (0, 6.0e4), (0, -3.0), (7, 300.0), (11, -256.0)])
def test_damaged_tensor_values_are_detected_on_both_backends(dwt_set, tmp_path, backend,
                                                             channel, value):
    """NaN/Inf used to reach the model on DALI (blamed on the learning rate), and finite garbage
    passed both backends; every value must lie within a Haar DWT of uint8 pixels."""
    shards = _copy(dwt_set, tmp_path)
    key = _damage_values(shards, 0, 3, channel, value)
    loader, batches = _run_epoch(shards, backend)
    assert loader.skipped_samples == 1 and list(loader.damaged_shards) == ["shard-000000.tar"]
    assert all(key not in b.keys for b in batches)
    for b in batches:
        assert torch.isfinite(b.x0).all() and b.x0.abs().max() <= 1.0
    if backend == "dali":
        _same(batches, _run_epoch(shards, "torch")[1])
    with pytest.raises(SampleError, match="dwt16"):
        _run_epoch(shards, backend, strict=True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_corrupt_jpeg_is_replaced_and_counted(jpeg_set, tmp_path, backend):
    shards = _copy(jpeg_set, tmp_path)
    m = load_manifest(shards)
    tar = shards / m.shards[0].name
    entry = parse_index((shards / m.shards[0].index).read_text())[3]
    jpg = next(c for c in entry if c.ext == "jpg")
    data = bytearray(tar.read_bytes())
    data[jpg.offset:jpg.offset + 4] = b"\0\0\0\0"  # destroy the SOI marker
    tar.write_bytes(bytes(data))
    loader, batches = _run_epoch(shards, backend)
    assert loader.skipped_samples == 1
    bad_key = entry[0].name.split(".")[0]
    assert all(bad_key not in b.keys for b in batches)


def test_missing_shard_file_is_left_out(dwt_set, tmp_path):
    shards = _copy(dwt_set, tmp_path)
    m = load_manifest(shards)
    (shards / m.shards[0].name).unlink()
    gone = {e[0].name.split(".")[0] for e in parse_index((shards / m.shards[0].index).read_text())}
    loader, batches = _run_epoch(shards)
    assert list(loader.reader.excluded) == [m.shards[0].name]
    assert loader.reader.num_samples == m.num_samples - 16
    assert loader.skipped_samples == 0
    assert not gone & {k for b in batches for k in b.keys}


def test_bench_data_measures_cpu_workers_against_the_same_work(dwt_set, capsys):
    """On a CPU device the torch workers convert to model space, so `bench data` prints a
    `raw+model space` row and takes the torch rows' per-worker share against it."""
    from maskdm.pipeline.cli import main
    assert main(["bench", "data", str(dwt_set), "--backends", "torch", "--workers", "1",
                 "--batch", "5", "--batches", "3", "--step-ms", "1", "--device", "cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(str(dwt_set))]
    kinds = [" ".join(r[2:-8]) for r in rows]
    assert kinds == ["raw (1 core)", "raw+model space", "torch"], rows
    raw_ms, torch_row = float(rows[1][-7]), rows[2]
    delivered, share = float(torch_row[-7]), float(torch_row[-6].rstrip("%"))
    assert abs(share - 100 * delivered / raw_ms) <= 1  # the torch row against raw+model space


@pytest.mark.parametrize("env", [{"LOCAL_WORLD_SIZE": "2"}, {"LOCAL_SIZE": "2"},
                                 {"SLURM_NTASKS_PER_NODE": "2(x2)"}])
def test_a_node_is_its_launcher_s_local_ranks(dwt_set, monkeypatch, env):
    """torchrun, the deepspeed launcher and srun each say how many ranks a node has: the node's
    partitions (what its cache must hold and what it downloads) are those of all of them."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    loader = Loader(dwt_set, global_batch=8, rank=3, world_size=4, partitions=4)
    assert loader.node_partitions() == [2, 3]
    assert "2 node(s): each node reads 2 partition(s)" in loader.describe()
