"""The offline wheelhouse for the GPU box (issue 36): wheels split to fit a transfer, packed into
transfers under the limit, joined and checked on the other side (benchmarks/wheelhouse.py and
wheelhouse_install.sh; no network: small stand-in files)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024


def test_split_pack_place_and_plan(tmp_path):
    from benchmarks import wheelhouse as wh
    big = tmp_path / "big-1.0-py3-none-any.whl"
    data = os.urandom(250 * KiB)
    big.write_bytes(data)
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"a" * 30 * KiB)
    (tmp_path / "z-1-py3-none-any.whl").write_bytes(b"z" * 90 * KiB)
    parts = wh.split(big, 100 * KiB)
    assert [p.name for p in parts] == [f"{big.name}.part{i:03d}" for i in range(3)]
    assert not big.exists() and b"".join(p.read_bytes() for p in parts) == data
    assert wh.split(tmp_path / "a-1-py3-none-any.whl", 100 * KiB) == \
        [tmp_path / "a-1-py3-none-any.whl"]
    sizes = {f.name: f.stat().st_size for f in tmp_path.iterdir()}
    transfers = wh.pack(sizes, 120 * KiB)
    assert all(sum(sizes[n] for n in t.files) <= 120 * KiB for t in transfers)
    assert sorted(n for t in transfers for n in t.files) == sorted(sizes)
    order = [n for t in transfers for n in t.files if ".part" in n]
    assert order == sorted(order)  # a wheel's parts travel in order
    assert transfers[-1].last and not any(t.last for t in transfers[:-1])
    with pytest.raises(ValueError, match="does not fit in one transfer"):
        wh.pack({"huge.whl": 200 * KiB}, 120 * KiB)
    wh.place(tmp_path, transfers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"t{i}" for i in
                                                          range(1, len(transfers) + 1)]
    text = wh.plan_text(transfers, 2.5, "wheelhouse", 420)
    assert f"{len(transfers)} transfer(s)" in text and "estimated device time:" in text
    assert text.count("carry [\"wheelhouse/t") == len(transfers)
    assert "wheelhouse_install.sh /tmp/wheelhouse /tmp/site" in text.split("transfer ")[-1]
    assert wh.norm("PyWavelets") == wh.norm("pywavelets") == "pywavelets"
    assert wh.norm("typing_extensions") in wh.box_packages(
        ROOT / "benchmarks" / "gpu_box_packages.txt")


def test_the_install_script_joins_checks_and_names_a_damaged_part(tmp_path):
    """On the box: the parts joined back into the wheel, every wheel checked against SHA256SUMS
    before pip sees it; a part damaged in transit stops it with one line."""
    from benchmarks import wheelhouse as wh
    box = tmp_path / "box"
    box.mkdir()
    whl = box / "pkg-1.0-py3-none-any.whl"
    whl.write_bytes(os.urandom(300 * KiB))
    small = box / "tiny-1-py3-none-any.whl"
    small.write_bytes(b"tiny")
    wh.write_sums(box, {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in (whl, small)})
    wh.split(whl, 128 * KiB)
    env = {**os.environ, "PYTHON": "echo"}  # pip stands aside: what it would be asked to do
    script = str(ROOT / "benchmarks" / "wheelhouse_install.sh")
    r = subprocess.run(["bash", script, str(box), str(tmp_path / "site")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--no-index --no-deps" in r.stdout and "pkg-1.0-py3-none-any.whl" in r.stdout
    assert whl.exists() and not list(box.glob("*.part*"))
    # a damaged part: refused before any install
    whl.unlink()
    small.unlink()
    whl.write_bytes(os.urandom(300 * KiB))
    small.write_bytes(b"tiny")
    wh.split(whl, 128 * KiB)
    r = subprocess.run(["bash", script, str(box), str(tmp_path / "site")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not match SHA256SUMS" in r.stderr
    assert "pip install" not in r.stdout
    (box / "SHA256SUMS").unlink()
    r = subprocess.run(["bash", script, str(box), str(tmp_path / "site")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "SHA256SUMS is missing" in r.stderr
