"""Configuration: every recipe in configs/ loads and passes --dry-run; inheritance, overrides and
YAML number quirks behave; wrong keys and values are named."""

from __future__ import annotations

import json

import pytest

from maskdm.pipeline.cli import main as cli
from maskdm.pipeline.config import ConfigError, deepspeed_config, load_config
from tests.conftest import ROOT

# training configs; configs/experiments/ also holds experiment files (`maskdm experiment`), whose
# *_train.yaml companions are training configs
EXPERIMENTS = sorted(p for p in (ROOT / "configs" / "experiments").glob("*.yaml")
                     if not p.stem.endswith("_train"))
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if not p.name.startswith("_") and p not in EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_file_plans_equal_flops(path, tmp_path):
    from maskdm.pipeline.experiment.fast_learner import Spec, plan
    spec = Spec.load(path)
    runs = plan(spec, tmp_path, [f"data.image_size={spec.size}"])
    assert len(runs) == len(spec.arms) * len(spec.seeds)
    budget = spec.budget_steps * runs[0][0].flops_per_step
    arms = {a.name: a for a in spec.arms}
    steps = {st[0].arm: sum(s.steps for s in st) for st in runs}
    for stages in runs:
        arm = arms[stages[0].arm]
        total = sum(s.steps * s.flops_per_step for s in stages)
        if arm.match_images:  # the controlled arm's steps and images, at more FLOPs
            assert steps[arm.name] == steps[arm.match_images]
            assert stages[0].batch == runs[0][0].batch and total > budget
            continue
        assert abs(total - budget) <= stages[-1].flops_per_step, stages[0].arm
        if arm.match_steps:  # the same FLOPs in about the controlled arm's steps
            assert abs(steps[arm.name] / steps[arm.match_steps] - 1) < 0.05, arm.name


def test_the_recipe_set_covers_the_paper():
    names = {p.stem for p in RECIPES}
    for table2 in ("celebahq256_maskdm_b_pretrain", "celebahq256_maskdm_b_finetune",
                   "celebahq256_maskdm_l_pretrain", "celebahq256_maskdm_l_finetune",
                   "celebahq256_ddpm", "vggface2_256_pretrain", "celebahq256_s_pretrain_r90",
                   "transfer_celebahq10pct_finetune", "transfer_celebahq1pct_finetune",
                   "transfer_celebahq10pct_scratch", "transfer_celebahq1pct_scratch"):
        assert table2 in names
    for kind in ("patch", "block2", "block4", "crop"):
        for r in (10, 50, 90):
            assert f"celeba64_{kind}_r{r}" in names
    assert "celeba64_block8_r50" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_passes_dry_run(path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli(["train", "--config", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "# resolved config" in out and '"train_batch_size"' in out
    if path.parent.name == "paper":
        assert path.read_text().startswith("#"), "each recipe says what it reproduces"


# The paper's values (P: paper text, A: the authors' configs at github.com/jiachenlei/maskdm
# commit 40907a6) that each recipe must carry. A recipe that drifts from them fails here.
_T2 = {"data.space": "dwt", "data.image_size": 256, "diffusion.schedule": "cosine",  # P
       "optim.betas": [0.99, 0.99], "optim.weight_decay": 0.03, "optim.ema_decay": 0.999,  # P
       "optim.weight_decay_on": "all", "optim.warmup_steps": 0, "optim.grad_clip": 0,  # A
       "optim.ema_every": 10, "optim.ema_warmup": "power", "model.qkv_bias": True,  # A
       "model.dwt_tokens": "split", "model.patch_size": 4,  # A: LL / details, 2048 tokens
       "eval.fid_samples": 30000, "eval.steps": 500, "eval.sampler": "ddim",  # P
       "eval.eta": 1.0}  # A (evaluation default)
_T3 = {"data.space": "pixel", "model.preset": "MaskDM-S", "model.patch_size": 4,  # P, A
       "diffusion.schedule": "cosine", "optim.weight_decay_on": "all",  # P, A
       "optim.ema_every": 1, "optim.ema_warmup": "power", "optim.warmup_steps": 0,  # A
       "eval.fid_samples": 10000, "eval.steps": 250, "eval.eta": 1.0,  # P, A
       "eval.fid_ref": "data/celebahq256"}  # P: the whole CelebA-HQ as reference
_C64 = {"data.space": "pixel", "data.image_size": 64, "model.preset": "MaskDM-S",  # P
        "model.patch_size": 4, "diffusion.schedule": "linear", "data.hflip": False,  # P, A
        "optim.lr": 2e-4, "optim.grad_clip": 0, "optim.warmup_steps": 0}  # A
_MSM = {"train.stage": "pretrain", "train.global_batch": 256}  # A
PAPER = {
    "celebahq256_maskdm_l_pretrain": {**_T2, "model.preset": "MaskDM-L", "mask.kind": "block",
                                      "mask.block_size": 4, "mask.ratio": 0.7,
                                      "train.steps": 200000, "train.global_batch": 128,
                                      "optim.lr": 1e-4},
    "celebahq256_maskdm_l_finetune": {**_T2, "model.preset": "MaskDM-L", "mask.kind": "none",
                                      "train.stage": "finetune", "train.steps": 550000,
                                      "train.global_batch": 16, "optim.lr": 5e-5},
    "celebahq256_maskdm_b_pretrain": {**_T2, "model.preset": "MaskDM-B", "mask.kind": "block",
                                      "mask.block_size": 4, "mask.ratio": 0.7,
                                      "train.steps": 200000},
    "celebahq256_maskdm_b_finetune": {**_T2, "model.preset": "MaskDM-B", "mask.kind": "none",
                                      "train.stage": "finetune", "train.steps": 550000,
                                      "train.global_batch": 16, "optim.lr": 5e-5},
    "celebahq256_ddpm": {**_T2, "model.preset": "MaskDM-L", "mask.kind": "none",  # 233M (P)
                         "train.stage": "pretrain", "train.init_from": None,
                         "train.steps": 900000, "train.global_batch": 16, "optim.lr": 5e-5},
    "vggface2_256_pretrain": {**_T3, "data.shards": "data/vggface2_256", "mask.kind": "block",
                              "mask.block_size": 4, "mask.ratio": 0.9, "train.steps": 200000,
                              "train.global_batch": 256, "optim.lr": 2e-4,
                              "optim.grad_clip": 1.0, "data.hflip": False},
    "celebahq256_s_pretrain_r90": {**_T3, "data.shards": "data/celebahq256", "mask.ratio": 0.9,
                                   "mask.kind": "block", "mask.block_size": 4,
                                   "train.steps": 200000, "train.global_batch": 256},
    **{f"transfer_celebahq{p}pct_finetune": {
        **_T3, "data.shards": f"data/celebahq256_{p}pct", "mask.kind": "none",
        "train.stage": "finetune", "train.init_from": "runs/vggface2_256_pretrain",
        "train.steps": 50000, "optim.lr": 5e-5, "train.global_batch": 64} for p in (1, 10)},
    **{f"transfer_celebahq{p}pct_scratch": {
        **_T3, "data.shards": f"data/celebahq256_{p}pct", "mask.kind": "none",
        "train.stage": "pretrain", "train.init_from": None, "train.steps": 200000,
        "train.global_batch": 64, "optim.lr": 5e-5} for p in (1, 10)},
    **{f"celeba64_{k}_r{r}": {**_C64, **_MSM, "mask.kind": k, "mask.ratio": r / 100}
       for k in ("patch",) for r in (10, 50, 90)},
    **{f"celeba64_block{b}_r{r}": {**_C64, **_MSM, "mask.kind": "block", "mask.block_size": b,
                                   "mask.ratio": r / 100}
       for b, rs in ((2, (10, 50, 90)), (4, (10, 50, 90)), (8, (50,))) for r in rs},
    **{f"celeba64_crop_r{r}": {**_C64, **_MSM, "mask.kind": "crop", "mask.crop_size": c}
       for r, c in ((10, 15), (50, 11), (90, 5))},  # A: visible window side
    "celeba64_ddpm": {**_C64, "mask.kind": "none", "train.global_batch": 128},  # A
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipes_carry_the_papers_settings(name):
    cfg = load_config([str(ROOT / "configs" / "paper" / f"{name}.yaml")])
    flat = {f"{section}.{key}": value for section, values in cfg.to_dict().items()
            for key, value in values.items()}
    wrong = {k: (flat.get(k), v) for k, v in PAPER[name].items() if flat.get(k) != v}
    assert not wrong, f"{name}: (recipe, paper) differ for {wrong}"


def test_every_paper_recipe_is_in_the_table():
    recipes = {p.stem for p in RECIPES if p.parent.name == "paper"}
    assert recipes - set(PAPER) <= {"celeba64_finetune"}, "add the new recipe's paper values"


def test_base_inheritance_overrides_and_yaml_numbers(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 1e-4\ntrain:\n  steps: 10\n  global_batch: 8\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  steps: 20\n")
    cfg = load_config([str(tmp_path / "b.yaml")], ["optim.warmup_steps=3", "mask.kind=patch"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-4 as str
    assert (cfg.train.steps, cfg.train.global_batch, cfg.optim.warmup_steps) == (20, 8, 3)
    assert cfg.mask.kind == "patch"
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (8, 4)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config([str(tmp_path / "loop.yaml")])


@pytest.mark.parametrize("sets,message", [
    (["train.stpes=3"], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
    (["optim.lr=fast"], "optim.lr must be a number"),
    (["train.steps=1.5"], "train.steps must be an integer"),
    (["mask.kind=patch", "mask.ratio=1.0"], "mask.ratio must be in [0, 1)"),
    (["train.stage=finetune", "mask.kind=none"], "needs train.init_from"),
    (["data.image_size=64", "model.patch_size=2", "mask.block_size=8", "mask.ratio=0.1"],
     "masks no block of the 4 8x8 blocks"),
    (["eval.fid_samples=1"], "eval.fid_samples >= 2"),
    (["diffusion.loss_weight=minsnr"], "diffusion.loss_weight"),
    (["diffusion.min_snr_gamma=0"], "diffusion.min_snr_gamma must be > 0"),
    (["trainsteps=3"], "section.name"),
])
def test_bad_values_are_named(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config([str(ROOT / "configs/test_tiny.yaml")], sets)
    assert message in str(e.value)


def test_dry_run_shows_the_deepspeed_config_for_the_world_size(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli(["train", "--config", str(ROOT / "configs/paper/celebahq256_maskdm_b_pretrain.yaml"),
                "--dry-run"]) == 0
    out = capsys.readouterr().out
    ds = json.loads(out.split("# DeepSpeed config for a world of 4 (set WORLD_SIZE to see another)\n")[1]
                    .split("\n#")[0])
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True


def test_dry_run_says_first_that_the_shards_are_missing(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert cli(["train", "--config", str(ROOT / "configs/test_tiny.yaml"), "--dry-run",
                "--set", f"data.shards={missing}"]) == 0
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first.startswith("warning: ") and f"data.shards={missing} does not exist" in first
    assert "maskdm shard SRC" in first and captured.out.startswith("# resolved config")


def test_resuming_a_checkpoint_from_an_older_version_reads_its_missing_keys_as_defaults():
    """A checkpoint's config written before a key existed (here diffusion.loss_weight) resumes
    when the key is at its default (what the older version did); a fixed key that differs
    from it is refused by name."""
    from maskdm.pipeline.train import _check_resume_config
    cfg = load_config([str(ROOT / "configs/test_tiny.yaml")])
    saved = cfg.to_dict()
    del saved["diffusion"]["loss_weight"], saved["diffusion"]["min_snr_gamma"]
    assert _check_resume_config(saved, cfg) == []
    weighted = load_config([str(ROOT / "configs/test_tiny.yaml")],
                           ["diffusion.loss_weight=min_snr"])
    with pytest.raises(ConfigError, match="diffusion.loss_weight: 'uniform' -> 'min_snr'"):
        _check_resume_config(saved, weighted)
