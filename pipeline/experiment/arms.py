"""The arms of ``maskdm experiment fast-learner`` and their plan: which runs, how many steps each.

Every arm gets the FLOPs of ``budget_steps`` DSM-from-scratch steps (``model/flops.py``,
pre-training included), except an ``match_images`` control, which is allowed more (said in the
table). Kinds of arm:

- the **reference**: DSM from scratch (``mask: {kind: none}``, nothing else);
- **two-stage**: pre-training for ``switch`` of the budget (MSM with its ``mask``, where the
  encoder sees only the visible tokens, or DSM at ``pretrain_size``), then DSM fine-tuning from the
  pre-trained EMA weights; ``sets`` change both stages, ``pretrain_sets`` the first (MaskDiT:
  ``sets: [model.decoder_depth=2, ...]``, ``pretrain_sets: [train.mae_weight=0.1]``);
- **controls** for the confound of cheap steps (at equal FLOPs a masked step is cheaper, so a
  two-stage arm takes more optimizer steps and sees more images than the reference):
  ``match_steps: ARM`` is DSM from scratch at the smaller global batch that gives ARM's total
  step count at the same FLOPs (DSM's cost per image is fixed, so it sees the reference's number
  of images); ``match_images: ARM`` is DSM from scratch at the reference's batch for ARM's total
  step count: ARM's steps *and* images, at more FLOPs than the budget (no DSM arm can see more
  images at equal FLOPs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maskdm.model.masks import MaskSpec

from ..config import ConfigError, check_shapes, load_config

METRICS = ("swd_patch", "swd_image", "heldout_loss")
CONTROLS = ("match_steps", "match_images")


@dataclass
class Arm:
    name: str
    mask: dict  # MaskSpec fields of the pre-training; kind none: DSM
    sets: list[str] = field(default_factory=list)  # --set overrides of both stages
    pretrain_sets: list[str] = field(default_factory=list)  # ... of the pre-training only
    pretrain_size: int | None = None  # pre-train at this image size (resolution transfer)
    match_steps: str | None = None  # control: DSM with this arm's step count at equal FLOPs
    match_images: str | None = None  # control: DSM with this arm's steps and images

    @property
    def two_stage(self) -> bool:
        """False for DSM from scratch (the reference arm) and the DSM controls."""
        return MaskSpec(**self.mask).is_masked or self.pretrain_size is not None

    @property
    def control_of(self) -> str | None:
        return self.match_steps or self.match_images

    @property
    def is_reference(self) -> bool:
        return not self.two_stage and self.control_of is None

    def as_dict(self) -> dict:
        out = {"mask": self.mask}
        for k in ("sets", "pretrain_sets", "pretrain_size", *CONTROLS):
            if getattr(self, k):
                out[k] = getattr(self, k)
        return out

    @classmethod
    def parse(cls, name: str, value, where) -> "Arm":
        value = dict(value or {})
        known = {"mask", "sets", "pretrain_sets", "pretrain_size", *CONTROLS}
        if set(value) - known:
            raise ConfigError(f"{where}: arm {name}: unknown key(s) "
                              f"{', '.join(sorted(set(value) - known))}; known: "
                              f"{', '.join(sorted(known))}")
        for k in ("sets", "pretrain_sets"):
            if not isinstance(value.get(k, []), list):
                raise ConfigError(f"{where}: arm {name}: {k} must be a list of key=value")
        size = value.get("pretrain_size")
        if size is not None and (not isinstance(size, int) or size < 2 or size % 2):
            raise ConfigError(f"{where}: arm {name}: pretrain_size must be an even image size "
                              f"in pixels, got {size!r}")
        controls = [k for k in CONTROLS if value.get(k) is not None]
        if len(controls) > 1 or (controls and (set(value) - {"sets", *CONTROLS}
                                               or value.get("mask", {"kind": "none"}).get(
                                                   "kind", "none") != "none")):
            raise ConfigError(f"{where}: arm {name}: a control ({' or '.join(CONTROLS)}: ARM) is "
                              f"DSM from scratch; it takes one of them and at most `sets`")
        return cls(name, dict(value.get("mask") or {"kind": "none"}),
                   [str(x) for x in value.get("sets", [])],
                   [str(x) for x in value.get("pretrain_sets", [])], size,
                   *(str(value[k]) if value.get(k) is not None else None for k in CONTROLS))


@dataclass
class Spec:
    """An experiment file (see configs/experiments/)."""

    name: str
    train_config: Path
    arms: list[Arm]
    budget_steps: int = 2000
    switch: float = 0.5
    evals: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    metric: str = "swd_image"
    shards: str | None = None  # training shards; default: the procedural set, sharded here
    heldout: str | None = None  # held-out shards; default: a second procedural set
    size: int = 32
    count: int = 4000
    heldout_count: int = 512
    score_samples: int | None = None  # default: the training config's eval.score_samples
    sample_steps: int | None = None  # default: the training config's eval.steps
    sets: list[str] = field(default_factory=list)  # --set overrides for every run

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Spec":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of experiment settings")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        for key in ("name", "train_config", "arms"):
            if key not in data:
                raise ConfigError(f"{path}: '{key}' is required")
        arms_in = data.pop("arms")
        if not isinstance(arms_in, dict) or not arms_in:
            raise ConfigError(f"{path}: arms must map arm names to {{mask: {{...}}}}")
        arms = [Arm.parse(n, a, path) for n, a in arms_in.items()]
        data["train_config"] = (path.parent / data["train_config"]).resolve()
        spec = cls(arms=arms, **data)
        spec.check(path)
        return spec

    def check(self, where) -> None:
        for a in self.arms:
            try:
                MaskSpec(**a.mask).validate()
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: arm {a.name}: mask {a.mask}: {e}") from None
        refs = [a for a in self.arms if a.is_reference]
        if len(refs) != 1:
            raise ConfigError(f"{where}: exactly one arm must be DSM from scratch (mask kind "
                              f"none, no pretrain_size, not a control), found {len(refs)}")
        two_stage = {a.name for a in self.arms if a.two_stage}
        for a in self.arms:
            if a.pretrain_size is not None and a.pretrain_size >= self.size:
                raise ConfigError(f"{where}: arm {a.name}: pretrain_size {a.pretrain_size} must "
                                  f"be below the image size {self.size}")
            if a.control_of is not None and a.control_of not in two_stage:
                raise ConfigError(f"{where}: arm {a.name}: {a.control_of!r} is not a two-stage "
                                  f"arm of this file (choose from {', '.join(sorted(two_stage))})")
        if not 0 < self.switch < 1:
            raise ConfigError(f"{where}: switch must be in (0, 1) (the fraction of the FLOPs "
                              f"spent on MSM pre-training), got {self.switch}")
        if self.budget_steps < 2 or self.evals < 1 or not self.seeds:
            raise ConfigError(f"{where}: budget_steps must be >= 2, evals >= 1, seeds non-empty")
        if self.metric not in METRICS:
            raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}")
        if not self.train_config.exists():
            raise ConfigError(f"{where}: train_config {self.train_config} does not exist")

    @property
    def reference(self) -> Arm:
        return next(a for a in self.arms if a.is_reference)


def mask_sets(mask: dict) -> list[str]:
    kind = mask.get("kind", "none")
    out = [f"mask.kind={kind}"]
    for k, v in mask.items():
        if k != "kind":
            out.append(f"mask.{k}={v}")
    return out


@dataclass
class Stage:
    arm: str
    seed: int
    stage: str  # pretrain | finetune
    run_dir: Path
    sets: list[str]  # --set overrides of this run, train.run_dir included
    steps: int
    score_every: int
    flops_per_step: float
    batch: int = 0  # the global batch (0: the training config's)

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed} {self.stage}"


def plan(spec: Spec, out: Path, base_sets: list[str]) -> list[list[Stage]]:
    """-> the runs of every (seed, arm), seed by seed: equal FLOPs for every arm (a
    ``match_images`` control excepted)."""
    per_step = {}

    def flops(sets: list[str], size: int) -> float:
        from maskdm.model.flops import step_flops
        key = json.dumps([sets, size])
        if key not in per_step:
            cfg = load_config([str(spec.train_config)], base_sets + sets)
            mcfg = check_shapes(cfg, size)
            per_step[key] = float(step_flops(mcfg, cfg.mask, cfg.train.global_batch))
        return per_step[key]

    batch = load_config([str(spec.train_config)], base_sets).train.global_batch
    dsm = flops(mask_sets({"kind": "none"}), spec.size)
    budget = spec.budget_steps * dsm
    every = max(1, round(budget / spec.evals / dsm))
    shapes: dict[str, list[tuple]] = {}  # arm -> [(stage, steps, cost, sets, score_every)]
    for arm in spec.arms:
        if arm.is_reference:
            shapes[arm.name] = [("pretrain", spec.budget_steps, dsm,
                                 arm.sets + mask_sets(arm.mask), every)]
        elif arm.two_stage:
            pre_sets = arm.sets + mask_sets(arm.mask) + arm.pretrain_sets
            size = spec.size
            if arm.pretrain_size is not None:  # its own shards; the scores need spec.size
                size = arm.pretrain_size
                pre_sets += [f"data.shards={out / 'data' / f'train{size}'}",
                             f"data.image_size={size}"]
            pre_cost = flops(pre_sets, size)
            fine_cost = flops(arm.sets + mask_sets({"kind": "none"}), spec.size)
            pre = max(1, round(spec.switch * budget / pre_cost))
            fine = max(1, round((budget - pre * pre_cost) / fine_cost))
            pre_every = 0 if arm.pretrain_size else max(1, round(budget / spec.evals / pre_cost))
            shapes[arm.name] = [
                ("pretrain", pre, pre_cost, pre_sets, pre_every),
                ("finetune", fine, fine_cost, arm.sets + ["train.stage=finetune", "mask.kind=none"],
                 max(1, round(budget / spec.evals / fine_cost)))]
    for arm in spec.arms:  # the controls, from the step counts of the arms they control
        if arm.control_of is None:
            continue
        target = sum(s[1] for s in shapes[arm.control_of])
        b = max(1, round(batch * spec.budget_steps / target)) if arm.match_steps else batch
        sets = arm.sets + mask_sets({"kind": "none"}) + [f"train.global_batch={b}"]
        cost = flops(sets, spec.size)
        steps = max(1, round(budget / cost)) if arm.match_steps else target
        shapes[arm.name] = [("pretrain", steps, cost, sets,
                             max(1, round(budget / spec.evals / cost)))]
    runs = []
    for seed in spec.seeds:
        for arm in spec.arms:
            root = out / "runs" / arm.name / f"seed{seed}"
            stages = []
            for stage, steps, cost, sets, score_every in shapes[arm.name]:
                run_dir = root / (stage if arm.two_stage else "scratch")
                extra = [f"train.run_dir={run_dir}"]
                if stage == "finetune":
                    extra.append(f"train.init_from={root / 'pretrain'}")
                b = next((int(s.split("=", 1)[1]) for s in sets
                          if s.startswith("train.global_batch=")), batch)
                stages.append(Stage(arm.name, seed, stage, run_dir,
                                    [f"train.seed={seed}"] + sets + extra, steps, score_every,
                                    cost, b))
            runs.append(stages)
    return runs
