"""What a real cluster does to a run, done for real on 127.0.0.1 with CPU ranks (gloo): a job
re-queued on another number of ranks resumes through DeepSpeed's universal checkpoint and sees
the same samples at every step."""

from __future__ import annotations

import json
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
