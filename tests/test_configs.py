"""Configuration: every recipe in configs/ loads and passes --dry-run; inheritance, overrides and
YAML number quirks behave; wrong keys and values are named."""

from __future__ import annotations

import json

import pytest

from maskdm.pipeline.cli import main as cli
from maskdm.pipeline.config import ConfigError, deepspeed_config, load_config
from tests.conftest import ROOT

RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("_"))


def test_the_recipe_set_covers_the_paper():
    names = {p.stem for p in RECIPES}
    for table2 in ("celebahq256_maskdm_b_pretrain", "celebahq256_maskdm_b_finetune",
                   "celebahq256_maskdm_l_pretrain", "celebahq256_maskdm_l_finetune",
                   "celebahq256_ddpm", "vggface2_256_pretrain", "transfer_celebahq10pct_finetune",
                   "transfer_celebahq1pct_finetune"):
        assert table2 in names
    for kind in ("patch", "block2", "block4", "block8", "crop"):
        for r in (10, 50, 90):
            assert f"celeba64_{kind}_r{r}" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_passes_dry_run(path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli(["train", "--config", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "# resolved config" in out and '"train_batch_size"' in out
    if path.parent.name == "paper":
        assert path.read_text().startswith("#"), "each recipe says what it reproduces"


def test_paper_recipe_values():
    b = load_config([str(ROOT / "configs/paper/celebahq256_maskdm_b_pretrain.yaml")])
    assert (b.model.preset, b.mask.kind, b.mask.block_size, b.mask.ratio) == ("MaskDM-B", "block", 4, 0.7)
    assert (b.train.steps, b.train.global_batch, b.optim.betas, b.optim.weight_decay) == \
        (200000, 128, [0.99, 0.99], 0.03)
    ft = load_config([str(ROOT / "configs/paper/celebahq256_maskdm_b_finetune.yaml")])
    assert (ft.train.stage, ft.train.steps, ft.train.global_batch, ft.mask.kind) == \
        ("finetune", 550000, 16, "none")
    v = load_config([str(ROOT / "configs/paper/vggface2_256_pretrain.yaml")])
    assert (v.mask.ratio, v.train.global_batch) == (0.9, 256)
    t = load_config([str(ROOT / "configs/paper/transfer_celebahq1pct_scratch.yaml")])
    assert (t.train.stage, t.train.init_from, t.train.steps) == ("pretrain", None, 50000)
    assert t.data.shards == "data/celebahq256_1pct" and t.eval.fid_ref == "data/celebahq256"


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
