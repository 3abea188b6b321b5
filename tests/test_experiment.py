"""maskdm experiment: the speed-up arithmetic on curves with known answers, and the mechanics of
both experiments in --quick mode (arms, equal FLOPs, metrics logged, MLflow nesting, plots,
resume). Never the scientific outcome."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from maskdm.pipeline.experiment.compare import (
    Curve,
    first_reach,
    resolved_by,
    speedup,
    speedup_detail,
    spread,
)
from tests.conftest import ROOT


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_first_reach_interpolates_between_evaluation_points():
    c = Curve([1, 2, 3, 4], [10, 8, 4, 2])
    assert first_reach(c, 8) == 2
    assert first_reach(c, 6) == pytest.approx(2.5)  # halfway from 8 to 4
    assert first_reach(c, 11) == 1
    assert first_reach(c, 1) is None
    # not monotone: the first time counts
    assert first_reach(Curve([1, 2, 3], [5, 3, 4]), 3.5) == pytest.approx(1.75)


def test_speedup_reaches_and_stays_and_brackets_the_grid():
    scratch = Curve([1, 2, 3, 4], [10, 8, 6, 4])
    fast = Curve([1, 2, 3, 4], [9, 4, 3, 2])  # reaches scratch's final 4 at FLOPs 2, for good
    d = speedup_detail(scratch, fast)
    assert d["value"] == pytest.approx(4 / 2) and (d["lo"], d["hi"]) == (3 / 2, 4 / 1)
    assert d["kind"] == "exact" and d["reached_in"] == "dsm"
    slow = Curve([1, 2, 3, 4], [12, 11, 10, 8])  # ends at 8, which scratch reached at FLOPs 2
    d = speedup_detail(scratch, slow)
    assert d["value"] == pytest.approx(2 / 4) and (d["lo"], d["hi"]) == (1 / 4, 2 / 4)
    assert d["reached_in"] == "end"
    assert speedup(scratch, scratch) == 1
    # an arm at the target from its first point: the bracket has no upper end
    d = speedup_detail(scratch, Curve([1, 2], [3, 2], ["pretrain", "finetune"]))
    assert d["kind"] == "lower bound" and d["lo"] == 3 and d["reached_in"] == "pretrain"
    # noise: a reference that does not improve by more than its seeds differ resolves nothing
    assert resolved_by([scratch, Curve([1, 2, 3, 4], [9, 8, 6, 5])])
    assert not resolved_by([Curve([1, 2], [50, 52]), Curve([1, 2], [61, 58])])
    s = spread([1.0, 3.0])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 2)
    assert math.isnan(spread([float("nan")])["mean"])
    with pytest.raises(ValueError):
        Curve([2, 1], [0, 0])


def test_a_non_monotone_curve_gets_no_speed_up_from_a_dip():
    """MaskDiT's case: a dip during pre-training that does not last. Reaching a value counts only
    if the curve stays there; an arm that ends worse is charged all its FLOPs, so <= 1."""
    ref = Curve([1, 2, 3, 4], [10, 8, 7, 6])
    dips = Curve([1, 2, 3, 4], [9, 5, 7, 8], ["pretrain", "pretrain", "finetune", "finetune"])
    d = speedup_detail(ref, dips)  # ends at 8 > 6: the first-reach rule said 2 / 1.25 = 1.6
    assert d["value"] == pytest.approx(2 / 4) and d["hi"] <= 1 and d["reached_in"] == "end"
    better = Curve([1, 2, 3, 4], [9, 3, 7, 4])  # ends better, but stays below 6 only after 3
    assert speedup(ref, better) == pytest.approx(4 / (3 + 1 / 3))
    assert first_reach(better, 6) == pytest.approx(1 + 3 / 6)  # (what the old rule used)
    # property: over random non-monotone curves with equal FLOPs, an arm that ends worse never
    # gets a speed-up (nor the top of its bracket) above 1
    g = np.random.default_rng(0)
    flops = [1.0, 2.0, 3.0, 4.0, 5.0]
    for _ in range(500):
        a, b = Curve(flops, list(g.uniform(0, 10, 5))), Curve(flops, list(g.uniform(0, 10, 5)))
        ref, arm = (a, b) if a.final < b.final else (b, a)
        d = speedup_detail(ref, arm)
        assert d["value"] <= 1 and d["hi"] <= 1 and d["lo"] <= d["value"], (ref, arm)


def test_a_point_is_a_non_square_input_and_msm_keeps_s_coordinates():
    from maskdm.model.uvit import UViT
    from maskdm.pipeline.experiment.toy import SHAPES, ToySettings, model_config, msm_spec
    for shape, (d, s) in SHAPES.items():
        cfg = model_config(shape, ToySettings(depth=2, dim=32, heads=2))
        assert cfg.grid == (1, d) and cfg.num_tokens == d
        assert msm_spec(shape).num_visible(cfg.grid) == s
        net = UViT(cfg)
        x = torch.randn(5, 1, 1, d)
        assert net(x, torch.zeros(5, dtype=torch.long)).shape == (5, 1, 1, d)
        keep = torch.arange(s).expand(5, s)
        assert net(x, torch.zeros(5, dtype=torch.long), keep).shape == (5, s, 1)


def test_training_configs_refuse_a_non_square_input(tmp_path):
    from maskdm.pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.input_width=8: training images are square"):
        load_config([str(ROOT / "configs" / "test_tiny.yaml")],
                    ["data.image_size=32", "model.input_width=8"])


def test_the_curve_distance_of_points_on_the_curve_is_zero():
    from maskdm.pipeline.experiment.toy import curve_distance, curve_points
    for shape in ("swissroll", "rose"):
        on = curve_points(shape, np.random.default_rng(0).random(500))
        assert curve_distance(on, shape) < 1e-3
        off = on + np.array([0.1] + [0.0] * (on.shape[1] - 1), dtype=np.float32)
        assert 0.01 < curve_distance(off, shape) <= 0.1 + 1e-3


@pytest.mark.slow
def test_toy_quick_writes_the_figure_and_results(tmp_path):
    r = subprocess.run([sys.executable, "-m", "maskdm", "experiment", "toy", "--quick",
                        "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "toy_results.json").read_text())
    assert [x["shape"] for x in res["results"]] == ["swissroll", "rose"]
    for x in res["results"]:
        for arm in ("scratch", "msm_dsm"):
            pts = x["runs"][arm]["0"]
            # equal FLOPs: both arms end within one DSM step of the budget
            assert abs(pts[-1]["flops"] - x["budget_flops"]) <= x["budget_flops"] / 40 + 1
            assert all(np.isfinite(p["swd"]) for p in pts)
        assert [p["stage"] for p in x["runs"]["msm_dsm"]["0"]][0] == "msm"
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert "speed-up" in (tmp_path / "toy_results.md").read_text()


def c_first(res: dict, arm: str) -> float:
    """The FLOPs of an arm's first evaluation point."""
    return res["curves"]["heldout_loss"][arm]["0"]["flops"][0]


def _quick_spec(tmp_path) -> str:
    """The CPU experiment's arms of every kind (not all of them: --quick trains every run)."""
    import yaml
    spec = yaml.safe_load((ROOT / "configs" / "experiments" / "fast_learner_cpu.yaml").read_text())
    keep = ("scratch", "block50", "patch90", "maskdit", "lowres16", "steps_block50",
            "images_block50")
    spec["arms"] = {k: spec["arms"][k] for k in keep}
    spec["train_config"] = str(ROOT / "configs" / "experiments" / spec["train_config"])
    path = tmp_path / "fast_learner_quick.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_fast_learner_quick_runs_every_arm_at_equal_flops_and_resumes(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "maskdm", "experiment", "fast-learner", "--config",
           _quick_spec(tmp_path), "--quick", "--out", str(out)]

    def run(*extra, timeout=900):
        return subprocess.run(cmd + list(extra), cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=timeout)
    r = run("--report")
    assert r.returncode == 2 and "no experiment has run there yet" in r.stderr, r.stderr[-2000:]
    r = run("--arms", "scratch,nope")
    assert r.returncode == 2 and "--arms: no arm nope" in r.stderr, r.stderr[-2000:]
    # --arms: only these are trained, and the results hold only the finished ones
    r = run("--arms", "block50,scratch")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.count("$ maskdm train") == 3, r.stdout[-3000:]
    part = json.loads((out / "results.json").read_text())
    assert list(part["arms"]) == ["scratch", "block50"]
    assert part["arms"]["block50"]["seeds"] == [0] and set(part["speedup"]) == {"block50"}
    r = run()
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.count("already finished") == 3 and r.stdout.count("$ maskdm train") == 8
    res = json.loads((out / "results.json").read_text())
    assert res["curves"]["heldout_loss"]["block50"] == part["curves"]["heldout_loss"]["block50"]
    assert list(res["arms"]) == ["scratch", "block50", "patch90", "maskdit", "lowres16",
                                 "steps_block50", "images_block50"]
    # the controls: block50's step count at equal FLOPs (a smaller batch), and its steps and
    # images at batch 32 (more FLOPs)
    block = res["arms"]["block50"]["stages"]
    steps = sum(s["steps"] for s in block)
    ctl, img = res["arms"]["steps_block50"]["stages"], res["arms"]["images_block50"]["stages"]
    assert len(ctl) == 1 and abs(ctl[0]["steps"] - steps) <= 2 and ctl[0]["batch"] < 32
    assert img[0]["steps"] == steps and img[0]["batch"] == 32
    table = (out / "results.md").read_text()
    assert f"| steps_block50 | 0 | {ctl[0]['steps']} ({ctl[0]['batch']}) |" in table
    for arm in ("block50", "maskdit", "lowres16"):
        assert [s["stage"] for s in res["arms"][arm]["stages"]] == ["pretrain", "finetune"]
    # equal FLOPs, read back from what the runs logged (train_flops of the last point)
    dsm = res["arms"]["scratch"]["stages"][0]["flops_per_step"]
    finals = {}
    for arm in res["arms"]:
        c = res["curves"]["heldout_loss"][arm]["0"]
        finals[arm] = c["flops"][-1]
        for m in ("swd_patch", "swd_image", "heldout_loss"):  # lowres16's 16 px stage: unscored
            assert len(res["curves"][m][arm]["0"]["values"]) >= (1 if arm == "lowres16" else 2)
    budget = res["budget_steps"] * dsm
    for arm, f in finals.items():
        if arm != "images_block50":
            assert abs(f - budget) <= dsm / 2 + 1, (arm, f, budget)
    assert finals["images_block50"] == pytest.approx(steps * dsm, rel=1e-6)
    # MSM steps are cheaper: the two-stage arms take more pre-training steps per FLOP
    pre = res["arms"]["patch90"]["stages"][0]
    assert pre["flops_per_step"] < res["arms"]["block50"]["stages"][0]["flops_per_step"] < dsm
    assert set(res["speedup"]) == {"block50", "patch90", "maskdit", "lowres16", "steps_block50",
                                   "images_block50"}
    # MaskDiT's decoder costs FLOPs in both stages; the 16 px DSM stage a quarter of a 32 px step
    # and it is not scored (the held-out references are 32 px)
    assert res["arms"]["maskdit"]["stages"][1]["flops_per_step"] > dsm
    low = res["arms"]["lowres16"]["stages"][0]
    assert 0.2 < low["flops_per_step"] / dsm < 0.3
    assert c_first(res, "lowres16") >= low["steps"] * low["flops_per_step"]
    log = (out / "runs" / "lowres16" / "seed0" / "finetune.log").read_text()
    assert "trained on 4x4 tokens, this model has 8x8" in log
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| block50 |" in (out / "results.md").read_text()
    # MLflow: one parent run with the eleven training runs nested under it, table and plot
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fast-learner-cpu")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("maskdm.kind") == "experiment"]
    assert len(parents) == 1
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 11 and all(x.info.status == "FINISHED" for x in children)
    assert all("train_flops" in x.data.metrics for x in children)
    scored = [x for x in children  # all but lowres16's 16 px stage
              if x.data.tags.get("mlflow.runName") != "lowres16 seed 0 (pretrain)"]
    assert len(scored) == 10 and all("swd_image" in x.data.metrics for x in scored)
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.json", "results.md", "curves.png"} <= arts
    # re-running continues: every run is already finished, nothing is trained again
    r2 = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("already finished") == 11 and "$ maskdm train" not in r2.stdout
    assert json.loads((out / "results.json").read_text())["curves"] == res["curves"]
    # --report trains nothing and writes the same results
    (out / "results.json").unlink()
    r4 = run("--report", timeout=600)
    assert r4.returncode == 0 and "$ maskdm train" not in r4.stdout, r4.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["final"] == res["final"]
    # ... but not with other settings: the folder's runs were planned for this switch point
    r3 = subprocess.run(cmd + ["--switch", "0.3"], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600)
    assert r3.returncode == 2 and "holds an experiment with other settings (switch differ)" \
        in r3.stderr, r3.stderr[-2000:]


def test_fast_learner_refuses_a_bad_experiment_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain_config: nowhere.yaml\narms:\n  a: {mask: {kind: patch, "
                   "ratio: 0.5}}\n")
    r = subprocess.run([sys.executable, "-m", "maskdm", "experiment", "fast-learner", "--config",
                        str(bad)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "exactly one arm must be DSM from scratch" in r.stderr
    bad.write_text("name: x\ntrain_config: nowhere.yaml\narms:\n  a: {mask: {kind: patch, "
                   "ratoi: 0.5}}\n")
    r = subprocess.run([sys.executable, "-m", "maskdm", "experiment", "fast-learner", "--config",
                        str(bad)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "arm a: mask" in r.stderr and "ratoi" in r.stderr, r.stderr


def test_an_experiment_folder_takes_new_arms_but_not_changed_ones(tmp_path, capsys):
    """More arms continue an experiment (finished runs kept); an arm whose definition changed
    does not; plans written when arms were only a mask still compare."""
    from maskdm.pipeline.experiment.fast_learner import ExperimentError, Spec, _check_same_plan
    exp = tmp_path / "e.yaml"
    (tmp_path / "t.yaml").write_text("model: {preset: tiny}\n")
    head = "name: e\ntrain_config: t.yaml\narms:\n  scratch: {}\n"
    exp.write_text(head + "  block50: {mask: {kind: block, ratio: 0.5, block_size: 2}}\n")
    out = tmp_path / "out"
    out.mkdir()
    spec = Spec.load(exp)
    old = {"budget_steps": spec.budget_steps, "switch": spec.switch, "evals": spec.evals,
           "arms": {"scratch": {"kind": "none"},
                    "block50": {"kind": "block", "ratio": 0.5, "block_size": 2}},
           "train_config": str(spec.train_config), "sets": ["data.image_size=32"]}
    (out / "plan.json").write_text(json.dumps(old))
    _check_same_plan(spec, out, ["data.image_size=32"])  # the old format, same arms: fine
    exp.write_text(exp.read_text() + "  lowres16: {pretrain_size: 16}\n  maskdit: {mask: "
                   "{kind: patch, ratio: 0.5}, sets: [model.decoder_depth=1], pretrain_sets: "
                   "[train.mae_weight=0.1]}\n")
    _check_same_plan(Spec.load(exp), out, ["data.image_size=32"])
    assert "adding arm(s) lowres16, maskdit" in capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert plan["arms"]["lowres16"] == {"mask": {"kind": "none"}, "pretrain_size": 16}
    assert plan["arms"]["maskdit"]["pretrain_sets"] == ["train.mae_weight=0.1"]
    exp.write_text(head + "  block50: {mask: {kind: block, ratio: 0.7, block_size: 2}}\n")
    with pytest.raises(ExperimentError, match=r"\(arm block50 differ\)"):
        _check_same_plan(Spec.load(exp), out, ["data.image_size=32"])
    from maskdm.pipeline.config import ConfigError
    for arm, message in (("{pretrain_size: 15}", "pretrain_size must be an even image size"),
                         ("{pretrain_size: 32}", "must be below the image size 32"),
                         ("{mask: {kind: none}, set: [a=b]}", "unknown key(s) set"),
                         ("{match_steps: nope}", "'nope' is not a two-stage arm of this file"),
                         ("{match_steps: block50, pretrain_size: 16}", "a control (match_steps"),
                         ("{match_steps: block50, match_images: block50}", "takes one of them")):
        exp.write_text(head + "  block50: {mask: {kind: block, ratio: 0.5}}\n" + f"  x: {arm}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            Spec.load(exp)
