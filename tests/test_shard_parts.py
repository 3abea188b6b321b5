"""`maskdm shard --part I/N` (issue 37): parts write exactly the shards one job would, in any
order, on any number of machines, side by side, killed and re-run; the last part (or `--merge`)
writes the manifest. Into a bucket each shard is uploaded as it is made, so the staging folder
stays bounded. Real processes, a real S3 server (moto), `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

JOB = ["procedural", "--size", "32", "--count", "300", "--samples-per-shard", "40", "--quiet"]


def shard(*args: str) -> int:
    from maskdm.pipeline.cli import main
    return main(["shard", *args])


def _same_as_one_job(one: Path, other: Path) -> None:
    names = sorted(p.name for p in one.glob("shard-*"))
    assert names and names == sorted(p.name for p in other.glob("shard-*"))
    for n in names:
        assert (one / n).read_bytes() == (other / n).read_bytes(), n
    assert (one / "skipped.jsonl").read_bytes() == (other / "skipped.jsonl").read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, other))
    a.pop("created_at"), b.pop("created_at")
    assert a == b  # statistics included: exact sums, in shard order


def test_parts_in_any_order_and_any_number_write_the_shards_of_one_job(tmp_path, capsys):
    one, three, two = tmp_path / "one", tmp_path / "three", tmp_path / "two"
    assert shard(JOB[0], str(one), *JOB[1:]) == 0
    for i in (2, 0):
        assert shard(JOB[0], str(three), *JOB[1:], "--part", f"{i}/3") == 0
        assert not (three / "manifest.json").exists()
    assert "not written yet" in capsys.readouterr().out
    assert shard("--merge", str(three)) == 1  # part 1 is missing: said, nothing written
    out, err = capsys.readouterr()
    assert "shards 2-4 of 0-7 not written yet" in out and "is not complete yet" in err, err
    assert not (three / "manifest.json").exists()
    # another setting in a part of this job is refused, naming it
    assert shard(JOB[0], str(three), *JOB[1:], "--seed", "7", "--part", "1/3") == 1
    assert "holds a different sharding job (seed differ)" in capsys.readouterr().err
    assert shard(JOB[0], str(three), *JOB[1:], "--part", "1/3") == 0  # the last: the manifest
    _same_as_one_job(one, three)
    assert shard("--merge", str(three)) == 0  # idempotent on a complete folder
    assert "complete, 300 samples in 8 shards" in capsys.readouterr().out
    assert shard("--verify", str(three), "--quick", "--quiet") == 0
    for i in (1, 0):  # another N: the same shards
        assert shard(JOB[0], str(two), *JOB[1:], "--part", f"{i}/2") == 0
    _same_as_one_job(one, two)
    assert shard(JOB[0], str(two), *JOB[1:], "--part", "2/2") == 1
    assert "--part I/N needs 0 <= I < N, got 2/2" in capsys.readouterr().err


def _popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskdm", "shard", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(cond, what: str, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


BIG = ["procedural", "--size", "32", "--count", "1600", "--samples-per-shard", "100", "--quiet",
       "--workers", "1"]


@pytest.mark.slow
def test_parts_side_by_side_one_killed_and_rerun_equal_one_job(tmp_path):
    one, out = tmp_path / "one", tmp_path / "out"
    assert shard(BIG[0], str(one), *BIG[1:]) == 0
    a = _popen(BIG[0], str(out), *BIG[1:], "--part", "0/2")
    b = _popen(BIG[0], str(out), *BIG[1:], "--part", "1/2")
    progress = out / ".progress"
    _wait_for(lambda: progress.exists() and any(progress.glob("shard-00000[0-7].json")),
              "part 0's first shard")  # (part 1 writes shards 8-15)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert b.wait(timeout=600) == 0, b.stderr.read()
    assert not (out / "manifest.json").exists()  # part 0 was killed: nobody finished the job
    again = subprocess.run([sys.executable, "-m", "maskdm", "shard", BIG[0], str(out), *BIG[1:],
                            "--part", "0/2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming:" in again.stdout and "wrote 1600 samples in 16 shards" in again.stdout
    _same_as_one_job(one, out)


@pytest.mark.slow
def test_parts_into_a_bucket_upload_as_they_go_and_equal_one_job(s3, tmp_path):
    """Two parts side by side into s3://, one through a slow link (its uploads lag behind its
    conversions): the stages never hold more than 2 x workers finished shards; part 1 killed and
    re-run redoes only what is missing; the bucket then holds the bytes of one local job."""
    from tests.netproxy import SlowLink
    one = tmp_path / "one"
    job = [a if a != "1" else "2" for a in BIG]  # 2 workers
    assert shard(job[0], str(one), *job[1:]) == 0
    url, fs = "s3://bkt/parts", s3["fs"]
    link = SlowLink(s3["port"], 2e6)
    stages = [tmp_path / "stage0", tmp_path / "stage1"]
    most = [0, 0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for i, st in enumerate(stages):
                most[i] = max(most[i], len(list(st.glob("shard-*.tar"))) if st.exists() else 0)
            time.sleep(0.02)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        a = _popen(job[0], url, *job[1:], "--part", "0/2", "--stage", str(stages[0]),
                   env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"})
        b = _popen(job[0], url, *job[1:], "--part", "1/2", "--stage", str(stages[1]))

        def records():
            fs.invalidate_cache()
            return [p for p in fs.ls("bkt/parts/.progress", refresh=True)
                    if p.rsplit("/", 1)[-1] >= "shard-000008"] \
                if fs.exists("bkt/parts/.progress") else []
        _wait_for(lambda: len(records()) >= 2, "part 1's first shards in the bucket")
        b.send_signal(signal.SIGKILL)
        b.wait()
        assert a.wait(timeout=600) == 0, a.stderr.read()
        b = subprocess.run([sys.executable, "-m", "maskdm", "shard", job[0], url, *job[1:],
                            "--part", "1/2", "--stage", str(stages[1])], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert b.returncode == 0, b.stderr
        assert "resuming:" in b.stdout, b.stdout
    finally:
        stop.set()
        watcher.join()
        link.close()
    assert 0 < most[0] <= 4 and most[1] <= 4, most  # 2 x workers at most, never the dataset
    for p in sorted(one.glob("shard-*")) + [one / "skipped.jsonl"]:
        assert fs.cat_file(f"bkt/parts/{p.name}") == p.read_bytes(), p.name
    a_m, b_m = json.loads((one / "manifest.json").read_text()), \
        json.loads(fs.cat_file("bkt/parts/manifest.json"))
    a_m.pop("created_at"), b_m.pop("created_at")
    assert a_m == b_m
    fs.invalidate_cache()
    assert not fs.exists("bkt/parts/.progress/source.json")  # the records went with the manifest
    assert not any(st.exists() for st in stages)  # removed after the upload
    assert shard("--verify", url, "--quiet") == 0
    assert shard("--merge", url) == 0



def test_a_source_in_a_bucket_gives_the_shards_of_the_same_local_source(s3, tmp_path, capsys):
    """Issue 37, item 3: SRC may be a folder or a zip in a bucket: the same shards (bytes) as
    the same files on local disk, skipped inputs and ignored files included."""
    import zipfile

    from PIL import Image

    from tests.conftest import noise_image
    raw, fs = tmp_path / "raw", s3["fs"]
    (raw / "sub").mkdir(parents=True)
    for i in range(14):
        Image.fromarray(noise_image(i, 40 + i, 48)).save(raw / ("sub" if i % 3 else "")
                                                         / f"{i:03d}.png")
    (raw / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, with its reason
    (raw / "notes.txt").write_text("ignored")
    (raw / ".hidden.png").write_bytes(b"never listed")
    with zipfile.ZipFile(tmp_path / "raw.zip", "w") as z:
        for p in sorted(raw.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(raw).as_posix())
    for p in sorted(raw.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"bkt/raw/{p.relative_to(raw).as_posix()}")
    fs.put_file(str(tmp_path / "raw.zip"), "bkt/zips/raw.zip")
    job = ["--size", "32", "--samples-per-shard", "4", "--quiet", "--workers", "2"]
    for src, remote in ((str(raw), "s3://bkt/raw"), (str(tmp_path / "raw.zip"),
                                                     "s3://bkt/zips/raw.zip")):
        local, there = tmp_path / f"l-{Path(src).name}", tmp_path / f"r-{Path(src).name}"
        assert shard(src, str(local), *job) == 0
        assert shard(remote, str(there), *job) == 0
        names = sorted(p.name for p in local.glob("shard-*"))
        assert names == sorted(p.name for p in there.glob("shard-*")) and len(names) == 8
        for n in names:
            assert (local / n).read_bytes() == (there / n).read_bytes(), n
        assert (local / "skipped.jsonl").read_bytes() == (there / "skipped.jsonl").read_bytes()
        m = json.loads((there / "manifest.json").read_text())
        assert m["source"]["path"] == remote and m["source"]["skipped"] == 1
        assert m["source"]["ignored_by_extension"] == {".txt": 1}
    capsys.readouterr()
    assert shard("s3://bkt/nothing-here", str(tmp_path / "x"), *job) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err, err


def test_records_written_by_someone_else_are_not_taken(tmp_path, capsys):
    """A progress record in a shared OUT that names another file or holds garbage is not taken
    (its shard is redone: the result is still one job's bytes); a damaged job record stops
    --merge with one line, never a traceback."""
    one, out = tmp_path / "one", tmp_path / "out"
    assert shard(JOB[0], str(one), *JOB[1:]) == 0
    assert shard(JOB[0], str(out), *JOB[1:], "--part", "0/2") == 0
    prog = out / ".progress"
    rec = json.loads((prog / "shard-000001.json").read_text())
    (tmp_path / "secret").write_bytes(b"x" * rec["bytes"])
    (prog / "shard-000001.json").write_text(json.dumps({**rec, "name": "../secret"}))
    (prog / "shard-000002.json").write_text(json.dumps({**rec, "sum": ["a"] * 12}))
    (prog / "shard-000000.json").write_text("[1, 2]")
    job = (out / ".maskdm-job.json").read_text()
    (out / ".maskdm-job.json").write_text('{"planned": "many"}')
    assert shard("--merge", str(out)) == 1
    err = capsys.readouterr().err
    assert "is not a maskdm sharding job record" in err and "Traceback" not in err, err
    (out / ".maskdm-job.json").write_text(job)
    assert shard(JOB[0], str(out), *JOB[1:], "--part", "1/2") == 0  # shards 4-7
    assert not (out / "manifest.json").exists()  # 0-2 are not taken from those records
    assert shard(JOB[0], str(out), *JOB[1:], "--part", "0/2") == 0  # redoes 0-2, finishes
    out_text = capsys.readouterr().out
    assert "resuming: 1 of 4 shards already complete" in out_text, out_text
    _same_as_one_job(one, out)
    m = json.loads((out / "manifest.json").read_text())
    assert all(s["name"].startswith("shard-") for s in m["shards"])


def test_a_whole_job_waits_for_running_parts(tmp_path, capsys):
    """A whole job tidies every shard's leftovers, so it is refused while a part holds its lock
    (here held by this test, as a running part would)."""
    import fcntl
    out = tmp_path / "out"
    assert shard(JOB[0], str(out), *JOB[1:], "--part", "0/2") == 0
    with open(out / ".lock-part-1-of-2", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert shard(JOB[0], str(out), *JOB[1:]) == 1
        assert "part 1/2 of this job is writing" in capsys.readouterr().err
    assert shard(JOB[0], str(out), *JOB[1:]) == 0  # the part is gone: the job finishes
    assert (out / "manifest.json").exists()
