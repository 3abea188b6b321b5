"""What a real cluster does to a run, done for real on 127.0.0.1 with CPU ranks (gloo): a job
re-queued on another number of ranks resumes through DeepSpeed's universal checkpoint and sees
the same samples at every step."""

from __future__ import annotations

import json
import sys
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.conftest import shard_set
from tests.test_train import ema, run_train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("cluster"), "s", count=96, samples_per_shard=32)


def _trace(run_dir: Path) -> dict[int, list[str]]:
    """Step -> the sample keys all ranks trained on at that step (sorted)."""
    steps = defaultdict(list)
    for f in sorted(run_dir.glob("data_trace_rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            steps[r["step"]] += r["keys"]
    return {s: sorted(k) for s, k in steps.items()}


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    """A run folder holding only ``src``'s checkpoint of ``step`` (the job that was stopped)."""
    name = f"step_{step:08d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_a_run_resumed_on_another_number_of_ranks_sees_the_same_data(shards, tmp_path, zero):
    """2 ranks to step 4, then resumed on 1 and on 4 ranks to step 8: every step trains on the
    samples of the uninterrupted 2-rank run, and the final weights agree with it to float
    rounding (the gradient sums are reduced in another order)."""
    sets = (f"train.zero_stage={zero}", "train.steps=8", "train.ckpt_every=4", "data.trace=true")
    ref = run_train(shards, tmp_path / "ref", *sets, ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _trace(tmp_path / "ref")
    assert sorted(want) == list(range(1, 9)) and all(len(k) == 8 for k in want.values())
    for ranks in (1, 4):
        run = tmp_path / f"on{ranks}"
        _copy_checkpoint(tmp_path / "ref", run, 4)
        r = run_train(shards, run, *sets, f"train.scratch_dir={tmp_path / 'scratch'}",
                      ranks=ranks, resume="auto")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"world size 2 -> {ranks}: the data stream continues at sample 32" in r.stdout
        assert "DeepSpeed's universal checkpoint" in r.stdout
        got = _trace(run)
        assert sorted(got) == [5, 6, 7, 8]
        assert all(got[s] == want[s] for s in got), "another sample order after the resume"
        a, b = ema(tmp_path / "ref"), ema(run)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (ranks, k)


@pytest.mark.slow
def test_a_world_size_that_cannot_take_the_batch_is_refused_before_anything_changes(
        shards, tmp_path):
    sets = ("train.steps=2", "train.ckpt_every=2")
    ref = run_train(shards, tmp_path / "run", *sets)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    before = {p.name: p.stat().st_mtime for p in ckpt.iterdir()}
    r = run_train(shards, tmp_path / "run", "train.steps=4", ranks=3, resume="auto")
    assert r.returncode != 0  # each rank exits 2 (a config error); torchrun then exits 1
    assert "written by 1 ranks) on 3 ranks: train.global_batch (8) must be divisible" in r.stderr
    assert {p.name: p.stat().st_mtime for p in ckpt.iterdir()} == before


# ------------------------------------------------------------------------ run folders in a bucket
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    """moto's S3 server with a bucket `runs`, and a slow link to it (uploads at 2 MB/s) so that
    a process can be killed in the middle of an upload."""
    from tests.netproxy import SlowLink
    from tests.test_store_outages import MotoStore
    store = MotoStore(tmp_path).start()
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "cache"))  # runs read from the bucket
    fs = store.fs()
    if not fs.exists("runs"):  # (moto keeps its buckets for the whole test process)
        fs.mkdir("runs")
    link = SlowLink(store.port, 2e6)
    yield {"store": store, "fs": fs, "env": store.env,
           "slow_env": {**store.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"}}
    link.close()
    store.stop()


def _rank_pid(proc, rank: int) -> int | None:
    import psutil
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "maskdm" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _committed(fs, prefix: str) -> set[str]:
    return {p.split("/")[-2] for p in fs.find(prefix) if p.endswith("/COMMITTED.json")}


@pytest.mark.slow
def test_a_run_in_a_bucket_killed_mid_upload_resumes_from_the_bucket(shards, tmp_path, bucket):
    """train.run_dir in a bucket, 2 ranks, every node in its own scratch folder. One rank is
    killed (-9) while step 8 is being uploaded: the bucket never calls it committed, and the run
    resumed on an empty scratch folder continues from step 4 to the uninterrupted run's weights,
    bit for bit; resumed on 1 rank instead, it sees the same samples at every step."""
    import os
    import signal
    import subprocess
    import time

    from tests.test_train import ROOT, _env, train_cmd
    sets = ("train.steps=12", "train.ckpt_every=4", "data.trace=true", "train.keep_last=2")
    ref = run_train(shards, tmp_path / "ref", *sets, ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    fs, url = bucket["fs"], "s3://runs/victim"
    proc = subprocess.Popen(train_cmd(shards, url, *sets, f"train.scratch_dir={tmp_path / 'a'}",
                                      ranks=2), cwd=ROOT, env={**_env(), **bucket["slow_env"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed, deadline = False, time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not killed:
            done = _committed(fs, "runs/victim")
            uploading = any("step_00000008/" in p for p in fs.find("runs/victim"))
            if "step_00000004" in done and uploading and "step_00000008" not in done:
                pid = _rank_pid(proc, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.05)
        assert killed, "the run ended before step 8 was being uploaded"
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _committed(fs, "runs/victim") == {"step_00000004"}  # step 8: half-uploaded, ignored
    fs.invalidate_cache()  # (the polling above filled s3fs's listing cache)
    fs.copy("runs/victim", "runs/victim1", recursive=True)  # the same state, for the 1-rank job
    assert _committed(fs, "runs/victim1") == {"step_00000004"}
    r = run_train(shards, url, *sets, f"train.scratch_dir={tmp_path / 'b'}",
                  "train.keep_scratch=true", ranks=2, resume="auto", env={**_env(), **bucket["env"]})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000004 at step 4" in r.stdout, r.stdout[-2000:]
    a, b = ema(tmp_path / "ref"), ema(tmp_path / "b" / "node0" / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    assert _committed(fs, "runs/victim") == {"step_00000008", "step_00000012"}  # keep_last 2
    assert fs.exists("runs/victim/export/model.safetensors")
    from maskdm.pipeline.export import export_weights  # maskdm export reads the bucket run
    export_weights(url, tmp_path / "x" / "export")
    exported = ema(tmp_path / "x")
    assert all(torch.equal(a[k], exported[k]) for k in a)
    one = run_train(shards, "s3://runs/victim1", *sets, f"train.scratch_dir={tmp_path / 'c'}",
                    "train.keep_scratch=true", ranks=1, resume="auto",
                    env={**_env(), **bucket["env"]})
    assert one.returncode == 0, one.stderr[-3000:]
    assert "world size 2 -> 1" in one.stdout
    want, got = _trace(tmp_path / "ref"), _trace(tmp_path / "c" / "node0" / "run")
    assert sorted(got) == list(range(5, 13)) and all(got[s] == want[s] for s in got)
    c = ema(tmp_path / "c" / "node0" / "run")
    for k in a:
        assert torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_two_nodes_sharing_only_a_bucket_checkpoint_and_resume_on_one(shards, tmp_path, bucket):
    """Two torchrun "nodes" on 127.0.0.1 (one rank each, separate scratch folders, nothing
    shared but the bucket) checkpoint into it and are stopped; one node resumes alone from the
    bucket: the data stream continues at the same sample, and the weights end as the
    uninterrupted run's (to float rounding: the gradients are summed by one rank now)."""
    import subprocess
    import sys

    from tests.test_train import ROOT, _env, _port
    sets = ["train.steps=8", "train.ckpt_every=4", "data.trace=true"]
    ref = run_train(shards, tmp_path / "ref", *sets, ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    port, url = _port(), "s3://runs/twonode"
    env = {**_env(), **bucket["env"]}
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
               "1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "maskdm", "train", "--config", str(ROOT / "configs" / "test_tiny.yaml"),
               "--set", f"data.shards={shards}", "--set", f"train.run_dir={url}",
               "--set", f"train.scratch_dir={tmp_path / f'node{node}'}", "--set",
               "train.steps=4", *[a for s in sets[1:] for a in ("--set", s)]]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert _committed(bucket["fs"], "runs/twonode") == {"step_00000004"}
    files = bucket["fs"].find("runs/twonode/checkpoints/step_00000004")
    assert any("zero_pp_rank_1_" in f for f in files)  # node 1's partition reached the bucket
    # each node had its own copy, and removed it once all was uploaded
    assert f"removed this node's local copy of the run ({tmp_path / 'node0'}" in outs[0]
    for node in (0, 1):
        assert not (tmp_path / f"node{node}").exists(), list((tmp_path / f"node{node}").rglob("*"))
    r = run_train(shards, url, *sets, f"train.scratch_dir={tmp_path / 'alone'}",
                  "train.keep_scratch=true", ranks=1, resume="auto", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2 -> 1: the data stream continues at sample 32" in r.stdout
    want, got = _trace(tmp_path / "ref"), _trace(tmp_path / "alone" / "node0" / "run")
    assert sorted(got) == [5, 6, 7, 8] and all(got[s] == want[s] for s in got)
    a, b = ema(tmp_path / "ref"), ema(tmp_path / "alone" / "node0" / "run")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


# ------------------------------------------------------------------------------- full disks
@pytest.fixture()
def small_disk(tmp_path):
    """A 48 MiB filesystem of its own (tmpfs), where the machine lets the test mount one."""
    from tests.conftest import small_filesystem
    with small_filesystem(tmp_path / "small", "48m") as where:
        yield where


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_stops_the_run_cleanly(shards, small_disk):
    """21 MiB checkpoints on a 48 MiB disk: the third does not fit. One line says so (folder,
    space, size), no partial checkpoint is left, the run stops with exit code 5 after the last
    good one, and `--resume auto` continues once there is room."""
    run = small_disk / "run"
    sets = ("train.steps=9", "train.ckpt_every=3", "train.keep_last=10")
    r = run_train(shards, run, *sets)
    assert r.returncode == 5, (r.returncode, r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"disk full: the checkpoint of step 9 did not fit in {run}"), last
    assert "a checkpoint takes 21 MiB" in last and "The last good checkpoint" in last
    assert "warning: checkpoint disk" in r.stderr  # said early: room for fewer than two
    assert "Traceback" not in r.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if "step_" in p.name)
    assert names == ["step_00000003", "step_00000006"], names  # no .tmp-step_ left behind
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    again = run_train(shards, run, *sets, "train.keep_last=1", resume="auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step_00000006 at step 6" in again.stdout


@pytest.mark.slow
def test_sharding_onto_a_full_disk_stops_in_one_line_and_finishes_later(small_disk, tmp_path):
    """~75 MB of shards onto the 48 MiB disk: one line (folder, space, what to do), exit code 5,
    no partial shard or temporary file left; with room again the same command finishes and the
    folder verifies."""
    import subprocess

    from tests.test_train import ROOT, _env
    out = small_disk / "shards"
    cmd = [sys.executable, "-m", "maskdm", "shard", "procedural", str(out), "--size", "64",
           "--count", "3000", "--samples-per-shard", "200", "--workers", "2", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 5, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full: shard-"), r.stderr[-2000:]
    assert f"did not fit in {out}" in lines[0] and "re-run the same command" in lines[0]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=160m", str(small_disk)], check=True)
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    from maskdm.preprocessing.verify import verify
    assert verify(out, quick=True, progress=False).ok


@pytest.mark.slow
def test_sigterm_checkpoints_uploads_and_asks_to_be_requeued(shards, tmp_path, bucket):
    """Pre-emption (Slurm's --signal, a spot VM's notice): SIGTERM mid-run -> a checkpoint of
    that step -> its upload committed in the bucket -> exit code 75; `--resume auto` (on an
    empty scratch folder, as on a new node) continues from it."""
    import os
    import signal
    import subprocess
    import time

    from tests.test_train import ROOT, _env, train_cmd
    sets = ("train.steps=400", "train.ckpt_every=10", "train.log_every=5")
    proc = subprocess.Popen(train_cmd(shards, "s3://runs/spot", *sets,
                                      f"train.scratch_dir={tmp_path / 'a'}"),
                            cwd=ROOT, env={**_env(), **bucket["slow_env"]},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            "step_00000010" not in _committed(bucket["fs"], "runs/spot"):
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be pre-empted"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, (proc.returncode, err[-3000:])
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM at step ") and "exit code 75: re-queue" in line
    step = int(line.split("at step ")[1].split()[0])
    assert f"step_{step:08d}" in _committed(bucket["fs"], "runs/spot")
    assert "(uploaded to s3://runs/spot)" in line
    r = run_train(shards, "s3://runs/spot", "train.steps=" + str(step + 5), *sets[1:],
                  f"train.scratch_dir={tmp_path / 'b'}", resume="auto",
                  env={**_env(), **bucket["env"]})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step_{step:08d} at step {step}" in r.stdout
