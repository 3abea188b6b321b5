"""Shared fixtures. Everything runs on the CPU with data the project generates itself."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # tests pick their own stores
os.environ.setdefault("PYTHONHASHSEED", "0")


def noise_image(seed: int, h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3] noise covering the full 0..255 range, extremes included."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[0, 0] = 0
    img[0, 1] = 255
    return img


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small procedural dwt16 shard set (32 px, 3 shards), shared read-only by many tests."""
    from maskdm.preprocessing.shard_job import ShardOptions, run
    out = tmp_path_factory.mktemp("shards") / "procedural32"
    run(ShardOptions(src="procedural", out=str(out), source="procedural", size=32, count=150,
                     samples_per_shard=50, workers=1, keep_jpeg=True), progress=False,
        log=lambda *a: None)
    return out


def shard_set(tmp_path: Path, name: str, **kw) -> Path:
    """Shard the procedural set into ``tmp_path/name`` with options ``kw`` (in-process)."""
    from maskdm.preprocessing.shard_job import ShardOptions, run
    out = tmp_path / name
    opts = dict(src="procedural", out=str(out), source="procedural", size=32, count=60,
                samples_per_shard=25, workers=1)
    opts.update(kw)
    run(ShardOptions(**opts), progress=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def standin_inception(tmp_path_factory) -> Path:
    """A stand-in for the FID Inception weights: the same architecture and file layout with
    seeded random weights, batch norms calibrated on procedural faces so the features are well
    scaled. Lets every FID code path run without the real (downloaded) weights."""
    import torch

    from maskdm.pipeline.eval.inception import FIDInception
    from maskdm.preprocessing.procedural import render
    torch.manual_seed(1234)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    imgs = torch.from_numpy(np.stack([render(99, i, 64) for i in range(12)]))
    net.train()
    with torch.no_grad():
        net(imgs)
    path = tmp_path_factory.mktemp("inception") / "standin_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@contextmanager
def small_filesystem(where: Path, size: str):
    """A tmpfs of ``size`` (e.g. "48m") mounted at ``where`` for the block, or the test skipped
    where the machine does not let it mount one."""
    import subprocess
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({r.stderr.strip() or r.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with bucket `bkt` holding `ds` (6 shards of 16 samples), and the local
    folder it was uploaded from."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the dev extra)")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    port = srv.get_host_and_port()[1]
    env = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
               AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    local = shard_set(tmp_path_factory.mktemp("s3src"), "ds", count=96, samples_per_shard=16)
    import fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("bkt"):  # (moto keeps its buckets per process, across servers)
        fs.mkdir("bkt")
    for f in sorted(local.iterdir()):
        if f.is_file():
            fs.put_file(str(f), f"bkt/ds/{f.name}")
    yield {"url": "s3://bkt/ds", "local": local, "fs": fs, "port": port}
    srv.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
