"""bf16/fp16 runs keep fp32 master weights inside DeepSpeed's optimizer; the module holds rounded
copies. The EMA must average the masters (else exported weights and fine-tuning start points are
bf16-rounded), and training must start from the exact fp32 initial weights. Checked on the real
DeepSpeed engine at every ZeRO stage (tests/masters_worker.py), on 1 and 2 CPU ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, shard_set
from tests.test_train import _env, _port, run_train

WORKER = str(ROOT / "tests" / "masters_worker.py")


def _worker(tmp_path: Path, zero: int, precision: str, ranks: int) -> list[dict]:
    if ranks == 1:
        head = [sys.executable, WORKER]
        env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_port", _port(), WORKER]
        env = _env()
    r = subprocess.run(head + [str(zero), precision, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{k}.pt") for k in range(ranks)]


def _gap(a: dict, b: dict) -> float:
    return max((a[n].float().flatten() - b[n].float().flatten()).abs().max().item() for n in a)


def _check(states: list[dict], low: bool) -> None:
    for s in states:
        assert _gap(s["start"], s["exact"]) == 0.0  # masters start from the fp32 init, exactly
        assert _gap(s["ema_start"], s["exact"]) == 0.0
        assert _gap(s["trained"], s["exact"]) > 1e-3  # the 3 steps moved the weights
        assert _gap(s["ema_end"], s["trained"]) == 0.0  # decay 0: the EMA is the masters
    if low and states[0]["world"] == 1:  # so the check above is not met by the rounded copy
        assert _gap(states[0]["rounded"], states[0]["trained"]) > 1e-4
    for s in states[1:]:  # every rank's whole EMA is the same
        assert _gap(s["ema_end"], states[0]["ema_end"]) == 0.0


def test_the_ema_averages_the_fp32_masters_of_a_bf16_zero2_run(tmp_path):
    _check(_worker(tmp_path, 2, "bf16", 1), low=True)


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(0, "bf16"), (1, "bf16"), (3, "bf16"), (0, "fp16"),
                                            (2, "fp16"), (2, "fp32")])
def test_masters_at_every_stage_and_precision(tmp_path, zero, precision):
    _check(_worker(tmp_path, zero, precision, 1), low=precision != "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_masters_split_over_two_ranks(tmp_path, zero):
    """ZeRO 2: each rank holds the masters of its slice and the EMA assembles them (sync);
    ZeRO 3: each rank's EMA partition follows its fp32 partition."""
    _check(_worker(tmp_path, zero, "bf16", 2), low=True)


@pytest.mark.slow
def test_a_bf16_training_run_exports_the_average_of_its_fp32_masters(tmp_path):
    """The real command on 2 ranks, bf16 ZeRO 2, EMA decay 0: the exported weights are the fp32
    masters of the last checkpoint (DeepSpeed's own zero_to_fp32 reading), not their bf16
    rounding."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    shards = shard_set(tmp_path, "s")
    sets = ("train.precision=bf16", "train.zero_stage=2", "optim.ema_decay=0")
    r = run_train(shards, tmp_path / "run", *sets, ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "step_00000006"
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(last.parent), tag=last.name)
    exported = load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert set(exported) == set(fp32)
    assert all(exported[n].dtype == torch.float32 for n in exported)
    assert _gap(exported, fp32) == 0.0
    rounded = {n: t.to(torch.bfloat16).float() for n, t in fp32.items()}
    assert _gap(rounded, fp32) > 1e-4  # the masters are not bf16 values: the check can fail
