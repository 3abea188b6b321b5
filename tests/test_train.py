"""Training: ZeRO 1/2/3 with 2 real CPU ranks == 1 rank; kill -9 + resume == uninterrupted;
pretrain -> finetune strict loading; bad configs fail early; non-finite losses stop cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, shard_set

CONFIG = str(ROOT / "configs" / "test_tiny.yaml")


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_cmd(shards: Path, run_dir: Path, *sets: str, ranks: int = 1, resume: str | None = None,
              config: str = CONFIG) -> list[str]:
    if ranks == 1:
        head = [sys.executable, "-m", "maskdm"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_port", _port(), "-m", "maskdm"]
    cmd = head + ["train", "--config", config, "--set", f"data.shards={shards}",
                  "--set", f"train.run_dir={run_dir}"]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def run_train(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(train_cmd(*args, **kw), cwd=ROOT, env=env or _env(), capture_output=True,
                       text=True, timeout=600)
    return r


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+\s+loss (\S+)", stdout, re.M)]


def ema(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shard_set(tmp_path_factory.mktemp("train"), "s", count=96, samples_per_shard=32)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_ranks_follow_one_rank(shards, tmp_path, zero):
    """The same samples at every step (exactly), the same losses and weights to float rounding:
    two ranks sum their gradients in another order, and Adam divides each update by the root of
    its squared-gradient average, so a rounding difference in a near-zero gradient moves its
    weight by up to ~lr x that relative difference (atol 1e-5 at lr 1e-3)."""
    one = run_train(shards, tmp_path / "one", f"train.zero_stage={zero}", "data.trace=true")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(shards, tmp_path / "two", f"train.zero_stage={zero}", "data.trace=true",
                    ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _keys_per_step(tmp_path / "one") == _keys_per_step(tmp_path / "two")
    l1, l2 = losses(one.stdout), losses(two.stdout)
    assert len(l1) == 3 and l1 == pytest.approx(l2, rel=1e-4)
    w1, w2 = ema(tmp_path / "one"), ema(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k


def _keys_per_step(run_dir: Path) -> dict[int, list[str]]:
    import json
    steps: dict[int, list[str]] = {}
    for f in sorted(run_dir.glob("data_trace_rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            steps.setdefault(r["step"], []).extend(r["keys"])
    return {s: sorted(k) for s, k in steps.items()}


def _logged(run_dir: Path) -> list[dict]:
    from maskdm.pipeline.tracking import read_jsonl
    return read_jsonl(run_dir / "metrics.jsonl")


def _all_finite(rows: list[dict]) -> None:
    import math
    assert rows
    for r in rows:
        bad = {k: v for k, v in r.items() if not math.isfinite(float(v))}
        assert not bad, f"step {r['step']}: non-finite {bad}"


@pytest.mark.slow
def test_every_logged_metric_is_finite_at_zero_0_and_its_grad_norm_is_the_true_one(shards,
                                                                                   tmp_path):
    """ZeRO 0 keeps no gradient norm in DeepSpeed: the trainer takes it itself, and it equals
    what ZeRO 1 reports for the same training (one rank, fp32: the same arithmetic)."""
    runs = {}
    for zero in (0, 1):
        r = run_train(shards, tmp_path / f"z{zero}", f"train.zero_stage={zero}",
                      "train.log_every=1")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "grad nan" not in r.stdout
        runs[zero] = _logged(tmp_path / f"z{zero}")
        _all_finite(runs[zero])
    norms = {z: [r["grad_norm"] for r in rows if "grad_norm" in r] for z, rows in runs.items()}
    assert len(norms[0]) == 6 and all(n > 0 for n in norms[0])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_every_logged_metric_is_finite_at_zero_2_and_3(shards, tmp_path, zero):
    r = run_train(shards, tmp_path / "run", f"train.zero_stage={zero}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _logged(tmp_path / "run")
    _all_finite(rows)
    assert [r["grad_norm"] > 0 for r in rows if "grad_norm" in r] == [True] * 6


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_two_cpu_ranks_as_documented(shards, tmp_path):
    """README: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 $(which maskdm) train ...` (the launcher
    passes --local_rank=N ahead of the subcommand)."""
    bindir = Path(sys.executable).parent
    deepspeed, maskdm = bindir / "deepspeed", bindir / "maskdm"
    if not (deepspeed.exists() and maskdm.exists()):
        pytest.skip("the deepspeed and maskdm scripts are not installed next to this python")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", _port(), str(maskdm), "train",
           "--config", CONFIG, "--set", f"data.shards={shards}",
           "--set", f"train.run_dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "2 rank(s) x 4 x 1 accumulation = 8 per step" in r.stdout
    assert len(losses(r.stdout)) == 3
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()


def _kill_during(cmd: list[str], ckpt_root: Path, after: str, delay: float) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not (ckpt_root / after).exists():
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(delay)  # somewhere between checkpoints
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_final_state(shards, tmp_path):
    sets = ("train.steps=24", "train.ckpt_every=4", "train.log_every=4")
    ref = run_train(shards, tmp_path / "ref", *sets)
    assert ref.returncode == 0, ref.stderr[-3000:]
    victim = tmp_path / "victim"
    _kill_during(train_cmd(shards, victim, *sets), victim / "checkpoints", "step_00000008", 0.3)
    done = sorted(p.name for p in (victim / "checkpoints").glob("step_*"))
    assert done and "step_00000024" not in done
    res = run_train(shards, victim, *sets, resume="auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    for k, v in ema(tmp_path / "ref").items():
        assert torch.equal(v, ema(victim)[k]), f"EMA {k} differs after resume"
    from maskdm.pipeline.checkpoint import load_pt  # weights_only=True, as the trainer loads
    a = load_pt(tmp_path / "ref/checkpoints/step_00000024/mp_rank_00_model_states.pt")["module"]
    b = load_pt(victim / "checkpoints/step_00000024/mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(a[k], b[k]) for k in a), "model weights differ after resume"
    oa = load_pt(next((tmp_path / "ref/checkpoints/step_00000024").glob("*optim_states.pt")))
    ob = load_pt(next((victim / "checkpoints/step_00000024").glob("*optim_states.pt")))
    sa = oa["optimizer_state_dict"]["base_optimizer_state"]["state"]
    sb = ob["optimizer_state_dict"]["base_optimizer_state"]["state"]
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), f"optimizer {key} differs"


@pytest.mark.slow
def test_pretrain_then_finetune_and_a_mismatched_checkpoint(shards, tmp_path):
    pre = run_train(shards, tmp_path / "pre", "train.steps=3")
    assert pre.returncode == 0, pre.stderr[-3000:]
    ft = run_train(shards, tmp_path / "ft", "train.stage=finetune", "mask.kind=none",
                   f"train.init_from={tmp_path / 'pre'}", "train.steps=3")
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "finetune" in ft.stdout and "visible tokens" in ft.stdout
    # train_flops is cumulative over the init_from chain: the fine-tune's count starts where the
    # pre-training's ended. 32px DWT, patch 2 -> 8x8 tokens; block 50% of 2x2 blocks keeps 32.
    from maskdm.model.config import ModelConfig
    from maskdm.model.flops import train_step_flops
    from maskdm.pipeline.tracking import read_jsonl
    m = ModelConfig(preset="tiny", in_channels=12, input_size=16, patch_size=2)
    msm, dsm = train_step_flops(m, 32) * 8, train_step_flops(m, 64) * 8
    pre_flops = {r["step"]: r["train_flops"]
                 for r in read_jsonl(tmp_path / "pre" / "metrics.jsonl") if "train_flops" in r}
    ft_flops = {r["step"]: r["train_flops"]
                for r in read_jsonl(tmp_path / "ft" / "metrics.jsonl") if "train_flops" in r}
    assert pre_flops == {s: s * msm for s in (1, 2, 3)}  # a point per step (tracking.points)
    assert ft_flops == {s: 3 * msm + s * dsm for s in (1, 2, 3)}
    bad = run_train(shards, tmp_path / "bad", "train.stage=finetune", "mask.kind=none",
                    f"train.init_from={tmp_path / 'pre'}", "train.steps=3", "model.dim=192",
                    "model.heads=4")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cannot initialise this model" in bad.stderr and "dim: 128 -> 192" in bad.stderr


@pytest.mark.slow
def test_finetune_at_another_image_size_interpolates_the_positional_embedding(shards, tmp_path):
    """Resolution transfer: pre-train at 32 px (8x8 tokens), fine-tune at 64 px (16x16 tokens)."""
    big = shard_set(tmp_path, "big", size=64, count=16, samples_per_shard=16)
    pre = run_train(shards, tmp_path / "pre", "train.steps=2")
    assert pre.returncode == 0, pre.stderr[-3000:]
    ft = run_train(big, tmp_path / "ft", "train.stage=finetune", "mask.kind=none",
                   f"train.init_from={tmp_path / 'pre'}", "train.steps=2")
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "trained on 8x8 tokens, this model has 16x16: positional embedding interpolated" \
        in ft.stdout
    from safetensors.torch import load_file
    pos = load_file(str(tmp_path / "ft" / "export" / "model.safetensors"))["pos_embed"]
    assert pos.shape[1] == 1 + 16 * 16
    other = run_train(big, tmp_path / "bad", "train.stage=finetune", "mask.kind=none",
                      f"train.init_from={tmp_path / 'pre'}", "train.steps=2",
                      "model.patch_size=4")
    assert other.returncode == 2 and "patch_size: 2 -> 4" in other.stderr
    assert "only the image size may change" in other.stderr


@pytest.mark.parametrize("sets,env,message", [
    (["train.stpes=3"], {}, "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
    (["mask.ratio=1.0"], {}, "mask.ratio must be in [0, 1)"),
    (["train.global_batch=9"], {"WORLD_SIZE": "2"}, "must be divisible by world size (2)"),
    (["data.shards=/nonexistent/shards"], {}, "data.shards: /nonexistent/shards: no such shard"),
    (["train.stage=finetune", "mask.kind=none"], {}, "needs train.init_from"),
    (["mask.block_size=3"], {}, "block_size 3 must divide the token grid 8x8"),
    (["train.steps=abc"], {}, "train.steps must be an integer"),
    (["train.mae_weight=0.1"], {}, "needs a decoder that predicts the masked tokens"),
    (["train.mae_weight=0.1", "model.decoder_depth=1", "mask.kind=none"], {},
     "masks none: set a mask"),
    (["model.decoder_depth=1", "model.dwt_tokens=split", "model.patch_size=4"], {},
     "use model.dwt_tokens: joint"),
])
def test_bad_configs_fail_before_training(shards, tmp_path, capsys, sets, env, message):
    from maskdm.pipeline.cli import main
    args = ["train", "--config", CONFIG, "--set", f"data.shards={shards}",
            "--set", f"train.run_dir={tmp_path / 'r'}"]
    for s in sets:
        args += ["--set", s]
    if env:
        args.append("--dry-run")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = main(args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    r = run_train(shards, tmp_path / "nan", "optim.lr=1.0e12", "optim.warmup_steps=0",
                  "optim.grad_clip=0", "train.steps=30", "train.ckpt_every=1", "train.log_every=1")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "non-finite loss" in r.stderr and "last good checkpoint" in r.stderr
    ckpts = sorted((tmp_path / "nan" / "checkpoints").glob("step_*"))
    assert ckpts, "the checkpoints before the blow-up are kept"
    last = torch.load(ckpts[-1] / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(v).all() for v in last.values())


class _Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_tampered_checkpoint_cannot_run_code(shards, tmp_path):
    """Every .pt file (ours and DeepSpeed's) is loaded with weights_only=True: resume, export,
    init_from and raw-weight sampling refuse a pickle that would execute code."""
    import shutil

    from maskdm.pipeline.cli import main
    good = tmp_path / "good"
    r = run_train(shards, good, "train.steps=3", "train.zero_stage=2")
    assert r.returncode == 0, r.stderr[-3000:]
    step = good / "checkpoints" / "step_00000003"
    marker = tmp_path / "pwned"
    cases = {"ema_rank00000.pt": "ema", "mp_rank_00_model_states.pt": "model",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt": "optim", "rng_rank00000.pt": "rng"}
    for fname, what in cases.items():
        run_dir = tmp_path / what
        shutil.copytree(good, run_dir)
        ck = run_dir / "checkpoints" / "step_00000003"
        original = torch.load(ck / fname, weights_only=False)
        torch.save({"evil": _Payload(marker), **(original if isinstance(original, dict) else {})},
                   ck / fname)
        res = run_train(shards, run_dir, "train.steps=6", "train.zero_stage=2", resume="auto")
        assert res.returncode == 2 and "refusing to load" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        if what == "ema":
            assert main(["export", str(ck), str(tmp_path / "export")]) == 2
            init = run_train(shards, tmp_path / "ft", "train.stage=finetune", "mask.kind=none",
                             f"train.init_from={ck}", "train.steps=1")
            assert init.returncode == 2 and "refusing to load" in init.stderr
        if what in ("model", "optim"):
            smp = subprocess.run([sys.executable, "-m", "maskdm", "sample", "--ckpt", str(ck),
                                  "--weights", "raw", "--n", "2", "--steps", "2",
                                  "--out", str(tmp_path / f"samples-{what}")],
                                 cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
            assert smp.returncode == 2 and "refusing to load" in smp.stderr, smp.stderr[-2000:]
        assert not marker.exists(), f"loading a tampered {fname} ran code"
    assert list(step.glob("*.pt"))  # the untouched original still resumes
    ok = run_train(shards, good, "train.steps=6", "train.zero_stage=2", resume="auto")
    assert ok.returncode == 0 and "resumed from" in ok.stdout, ok.stderr[-3000:]


@pytest.mark.slow
def test_a_tampered_checkpoint_cannot_run_code_when_resumed_on_another_world_size(shards, tmp_path):
    """Resuming on another number of ranks converts the ZeRO partitions with DeepSpeed's
    universal-checkpoint tool, which asks torch.load for weights_only=False: maskdm runs it with
    every load made weights_only, so a pickle that would run code stops the conversion (issue 35,
    finding 1: before, the command ran)."""
    run_dir = tmp_path / "run"
    r = run_train(shards, run_dir, "train.steps=3", "train.zero_stage=2", ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    marker = tmp_path / "pwned"
    ck = run_dir / "checkpoints" / "step_00000003"
    fname = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    original = torch.load(ck / fname, weights_only=False)
    torch.save({"evil": _Payload(marker), **original}, ck / fname)
    res = run_train(shards, run_dir, "train.steps=6", "train.zero_stage=2",
                    f"train.scratch_dir={tmp_path / 'scratch'}", resume="auto")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "universal-checkpoint conversion" in res.stderr and "refusing to load" in res.stderr, \
        res.stderr[-3000:]
    assert not marker.exists(), "the conversion ran the pickled code"


@pytest.mark.slow
def test_damaged_shards_do_not_stop_training(shards, tmp_path):
    """A garbage index and a NaN inside a tensor used to stop the run (all samples of a batch
    unreadable; a non-finite loss blamed on the learning rate). With data.strict: false training
    goes on and says what it lost; with data.strict: true it stops with a clear message."""
    import shutil

    import numpy as np

    from maskdm.shardformat.manifest import load_manifest
    from maskdm.shardformat.tarfmt import read_index
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    m = load_manifest(bad)
    (bad / m.shards[0].index).write_bytes(b"\x00\xff" * 500)
    entry = read_index(bad / m.shards[1].index)[5]
    c = next(c for c in entry if c.ext == "dwt16")
    with open(bad / m.shards[1].name, "r+b") as f:
        f.seek(c.offset + 100)
        f.write(np.array([np.nan], "<f2").tobytes())
    sets = ("train.steps=8", "train.ckpt_every=8", "train.log_every=4")
    r = run_train(bad, tmp_path / "lenient", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("damaged shard(s) left out of the order (32 of 96 samples)") == 1
    assert "shard-000000.idx: not a DALI index" in out
    assert "data: 1 damaged shard(s) left out of the order, 1 damaged sample(s) replaced " \
           "(found in shard-000001.tar)" in out
    strict = run_train(bad, tmp_path / "strict", *sets, "data.strict=true")
    assert strict.returncode == 2 and "data.strict" in strict.stderr, strict.stderr[-2000:]
    shutil.copy(shards / m.shards[0].index, bad / m.shards[0].index)  # only the NaN is left
    strict = run_train(bad, tmp_path / "strict2", *sets, "data.strict=true")
    assert strict.returncode == 4, strict.stderr[-2000:]
    assert "data: shard-000001.tar/" in strict.stderr and "dwt16 holds NaN/Inf" in strict.stderr
    assert "Traceback" not in strict.stderr


@pytest.mark.slow
def test_split_dwt_tokens_train_resume_and_sample(shards, tmp_path):
    """The authors' tokenisation end to end: masked pre-training with independent LL/detail masks,
    a resumed run, and sampling from the checkpoint."""
    sets = ("model.dwt_tokens=split", "model.patch_size=4", "mask.block_size=2", "train.steps=4",
            "train.ckpt_every=2")
    r = run_train(shards, tmp_path / "split", *sets[:-2], "train.steps=2", "train.ckpt_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-> 16/32 visible tokens" in r.stdout, r.stdout[-2000:]
    r = run_train(shards, tmp_path / "split", *sets, resume="auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    s = subprocess.run([sys.executable, "-m", "maskdm", "sample", "--ckpt", str(tmp_path / "split"),
                        "--n", "2", "--out", str(tmp_path / "smp")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert s.returncode == 0 and len(list((tmp_path / "smp").glob("*.png"))) == 2, s.stderr


@pytest.mark.slow
def test_maskdit_pretrain_unmasking_finetune_and_sampling(shards, tmp_path):
    """MaskDiT end to end, with the flip conditioning: 50% patch masking, DSM on the visible tokens
    + 0.1 x MAE on the masked ones through a 2-block decoder, then the unmasking fine-tune (mask 0,
    the decoder kept) and sampling (flip = 0)."""
    arch = ("model.decoder_depth=2", "model.decoder_dim=64", "model.flip_condition=true")
    pre = run_train(shards, tmp_path / "pre", *arch, "mask.kind=patch", "mask.ratio=0.5",
                    "train.mae_weight=0.1", "train.steps=2")
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "+ decoder 2 blocks, dim 64" in pre.stdout and "MAE weight 0.1" in pre.stdout
    assert "flip-conditioned" in pre.stdout and "-> 32/64 visible tokens" in pre.stdout
    ft = run_train(shards, tmp_path / "ft", *arch, "train.stage=finetune", "mask.kind=none",
                   f"train.init_from={tmp_path / 'pre'}", "train.steps=2")
    assert ft.returncode == 0, ft.stderr[-3000:]
    w = ema(tmp_path / "ft")
    assert w["mask_token"].shape == (1, 1, 64) and w["flip_embed.weight"].shape == (2, 128)
    assert not torch.equal(w["decoder_blocks.0.mlp.fc1.weight"],
                           ema(tmp_path / "pre")["decoder_blocks.0.mlp.fc1.weight"])
    s = subprocess.run([sys.executable, "-m", "maskdm", "sample", "--ckpt", str(tmp_path / "ft"),
                        "--n", "2", "--steps", "3", "--out", str(tmp_path / "smp")], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert s.returncode == 0 and len(list((tmp_path / "smp").glob("*.png"))) == 2, s.stderr
    # fine-tuned without the decoder: dropped, the head starts fresh on the encoder
    bare = run_train(shards, tmp_path / "bare", "model.flip_condition=true",
                     "train.stage=finetune", "mask.kind=none",
                     f"train.init_from={tmp_path / 'pre'}", "train.steps=1")
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert "its MaskDiT decoder (2 blocks) is dropped" in bare.stdout
    w = ema(tmp_path / "bare")
    assert not [k for k in w if k.startswith(("decoder", "mask_token"))]
    assert w["head.weight"].shape == (48, 128)
    other = run_train(shards, tmp_path / "bad", "model.decoder_depth=2", "model.decoder_dim=128",
                      "model.flip_condition=true", "train.stage=finetune", "mask.kind=none",
                      f"train.init_from={tmp_path / 'pre'}", "train.steps=1")
    assert other.returncode == 2 and "decoder_dim: 64 -> 128" in other.stderr


def test_a_first_launch_says_that_deepspeed_compiles_an_op(tmp_path, monkeypatch):
    import torch

    from maskdm.pipeline import dist
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    note = dist.op_build_note(torch.device("cpu"))
    assert note and "DeepSpeed compiles" in note and str(tmp_path / "empty") in note
    built = tmp_path / "built" / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "built"))
    assert dist.op_build_note(torch.device("cpu")) is None
