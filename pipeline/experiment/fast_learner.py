"""``maskdm experiment fast-learner``: does MSM pre-training make diffusion training faster?

Every arm gets the same budget of cumulative training FLOPs (``model/flops.py``, pre-training
included): the reference arm trains with DSM from scratch for ``budget_steps`` steps; a two-stage
arm spends the fraction ``switch`` of that budget on pre-training (cheaper steps: MSM with its mask,
where the encoder sees only the visible tokens, or DSM at a lower resolution, ``pretrain_size``)
and the rest on DSM fine-tuning from the pre-trained EMA weights. An arm may also change the
model or the objective (``sets`` for both stages, ``pretrain_sets`` for the first): MaskDiT is
``sets: [model.decoder_depth=2, ...]`` with ``pretrain_sets: [train.mae_weight=0.1]``. Each stage is an ordinary ``maskdm train`` run, so
the experiment exercises the real pipeline (shards, loader, DeepSpeed, EMA, checkpoints, MLflow).

All runs log the weight-free metrics (``eval.score_every``) against a held-out set at points
evenly spaced in FLOPs, together with ``train_flops``. The result (``OUT/results.json``,
``OUT/results.md``, ``OUT/curves.png``) compares the arms per seed at equal FLOPs and reports the
speed-up of each two-stage arm (``compare.speedup``) with its spread over seeds. Every run goes
into one MLflow experiment, nested under a parent run that gets the table and the plot.

Re-running the same command continues where it stopped: finished runs are kept, an interrupted
one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maskdm.console import show_progress
from maskdm.model.masks import MaskSpec
from maskdm.shardformat.fsutil import atomic_write_json, atomic_write_text

from ..config import ConfigError, check_shapes, load_config
from .compare import Curve, format_value, save_figure, spread, summarize_speedups

METRICS = ("swd_patch", "swd_image", "heldout_loss")
QUICK = {"budget_steps": 24, "evals": 2, "seeds": [0], "count": 192, "heldout_count": 32,
         "score_samples": 16, "sample_steps": 5}


@dataclass
class Arm:
    name: str
    mask: dict  # MaskSpec fields of the pre-training; kind none: DSM
    sets: list[str] = field(default_factory=list)  # --set overrides of both stages
    pretrain_sets: list[str] = field(default_factory=list)  # ... of the pre-training only
    pretrain_size: int | None = None  # pre-train at this image size (resolution transfer)

    @property
    def two_stage(self) -> bool:
        """False for DSM from scratch (the reference arm)."""
        return MaskSpec(**self.mask).is_masked or self.pretrain_size is not None

    def as_dict(self) -> dict:
        out = {"mask": self.mask}
        for k in ("sets", "pretrain_sets", "pretrain_size"):
            if getattr(self, k):
                out[k] = getattr(self, k)
        return out

    @classmethod
    def parse(cls, name: str, value, where) -> "Arm":
        value = dict(value or {})
        known = {"mask", "sets", "pretrain_sets", "pretrain_size"}
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
        return cls(name, dict(value.get("mask") or {"kind": "none"}),
                   [str(x) for x in value.get("sets", [])],
                   [str(x) for x in value.get("pretrain_sets", [])], size)


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
        refs = [a for a in self.arms if not a.two_stage]
        if len(refs) != 1:
            raise ConfigError(f"{where}: exactly one arm must be DSM from scratch (mask kind "
                              f"none, no pretrain_size), found {len(refs)}")
        for a in self.arms:
            if a.pretrain_size is not None and a.pretrain_size >= self.size:
                raise ConfigError(f"{where}: arm {a.name}: pretrain_size {a.pretrain_size} must "
                                  f"be below the image size {self.size}")
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
        return next(a for a in self.arms if not a.two_stage)


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

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed} {self.stage}"


def plan(spec: Spec, out: Path, base_sets: list[str]) -> list[list[Stage]]:
    """-> the runs of every (seed, arm), seed by seed: equal FLOPs for every arm."""
    per_step = {}

    def flops(sets: list[str], size: int) -> float:
        from maskdm.model.flops import step_flops
        key = json.dumps([sets, size])
        if key not in per_step:
            cfg = load_config([str(spec.train_config)], base_sets + sets)
            mcfg = check_shapes(cfg, size)
            per_step[key] = float(step_flops(mcfg, cfg.mask, cfg.train.global_batch))
        return per_step[key]

    dsm = flops(mask_sets({"kind": "none"}), spec.size)
    budget = spec.budget_steps * dsm
    every = max(1, round(spec.budget_steps / spec.evals))
    runs = []
    for seed in spec.seeds:
        for arm in spec.arms:
            root = out / "runs" / arm.name / f"seed{seed}"
            common = [f"train.seed={seed}"] + arm.sets
            if not arm.two_stage:
                runs.append([Stage(arm.name, seed, "pretrain", root / "scratch",
                                   common + mask_sets(arm.mask) +
                                   [f"train.run_dir={root / 'scratch'}"], spec.budget_steps,
                                   every, dsm)])
                continue
            pre_sets = arm.sets + mask_sets(arm.mask) + arm.pretrain_sets
            size = spec.size
            if arm.pretrain_size is not None:  # its own shards; the scores need spec.size
                size = arm.pretrain_size
                pre_sets += [f"data.shards={out / 'data' / f'train{size}'}",
                             f"data.image_size={size}"]
            pre_cost = flops(pre_sets, size)
            fine_cost = flops(arm.sets + mask_sets({"kind": "none"}), spec.size)
            pre_sets = [f"train.seed={seed}"] + pre_sets
            fine_sets = common + ["train.stage=finetune", "mask.kind=none"]
            pre = max(1, round(spec.switch * budget / pre_cost))
            fine = max(1, round((budget - pre * pre_cost) / fine_cost))
            pre_every = 0 if arm.pretrain_size else max(1, round(budget / spec.evals / pre_cost))
            runs.append([
                Stage(arm.name, seed, "pretrain", root / "pretrain",
                      pre_sets + [f"train.run_dir={root / 'pretrain'}"], pre, pre_every, pre_cost),
                Stage(arm.name, seed, "finetune", root / "finetune", fine_sets + [
                    f"train.run_dir={root / 'finetune'}", f"train.init_from={root / 'pretrain'}"],
                      fine, max(1, round(budget / spec.evals / fine_cost)), fine_cost)])
    return runs


def _finished(stage: Stage) -> bool:
    from ..checkpoint import complete_checkpoints, tag
    found = complete_checkpoints(stage.run_dir / "checkpoints")
    return bool(found) and found[-1].name == tag(stage.steps) and \
        (stage.run_dir / "export" / "model.safetensors").exists()


def _train(spec: Spec, stage: Stage, sets: list[str], log: Path) -> float:
    """One ``maskdm train`` run (resumed if interrupted) -> wall seconds."""
    from ..launch import run_maskdm
    scores = f"scores every {stage.score_every} steps" if stage.score_every else \
        "not scored (another image size than the references)"
    print(f"\n=== {stage.label}: {stage.steps} steps ({stage.steps * stage.flops_per_step:.3g} "
          f"FLOPs), {scores}", flush=True)
    print("$ maskdm train --config " + str(spec.train_config) + " " +
          " ".join(f"--set {s!r}" if " " in s else f"--set {s}" for s in sets) +
          " --resume auto", flush=True)
    t0 = time.time()
    code = run_maskdm(["train", "--config", str(spec.train_config), "--resume", "auto",
                       *[a for s in sets for a in ("--set", s)]], log)
    if code != 0:
        raise ExperimentError(f"{stage.label} failed (exit {code}); its log is {log}. Fix the "
                              f"cause and re-run the same command to continue.")
    return time.time() - t0


class ExperimentError(RuntimeError):
    pass


def read_curve(run_dirs: list[Path], metric: str) -> Curve:
    """The evaluation points of one arm (its runs in order) -> Curve over train_flops."""
    from ..tracking import read_jsonl
    flops, values = [], []
    for run in run_dirs:
        points = {}
        for r in read_jsonl(run / "metrics.jsonl"):
            if metric in r and "train_flops" in r:
                points[int(r["step"])] = (float(r["train_flops"]), float(r[metric]))
        for step in sorted(points):  # a resumed run may log a step twice: the last one counts
            flops.append(points[step][0])
            values.append(points[step][1])
    return Curve(flops, values)


def _prepare_data(spec: Spec, out: Path) -> tuple[str, str]:
    from maskdm.preprocessing.shard_job import ShardOptions
    from maskdm.preprocessing.shard_job import run as shard
    made = []
    jobs = [("train", spec.shards, spec.count, 0, spec.size),
            ("heldout", spec.heldout, spec.heldout_count, 1, spec.size)]
    for size in sorted({a.pretrain_size for a in spec.arms if a.pretrain_size}):
        if spec.shards:
            raise ConfigError(f"arms with pretrain_size need the procedural set (the experiment "
                              f"renders it at {size} px); shards: {spec.shards} cannot be resized")
        jobs.append((f"train{size}", None, spec.count, 0, size))  # the same faces, smaller
    for name, given, count, gen_seed, size in jobs:
        if given:
            made.append(given)
            continue
        folder = out / "data" / name
        if not (folder / "manifest.json").exists():
            print(f"$ maskdm shard procedural {folder} --size {size} --count {count} "
                  f"--gen-seed {gen_seed}", flush=True)
            shard(ShardOptions(src="procedural", out=str(folder), source="procedural",
                               size=size, count=count, gen_seed=gen_seed,
                               samples_per_shard=1000), progress=show_progress())
        made.append(str(folder))
    return made[0], made[1]


def run(spec: Spec, out: Path, *, quick: bool = False, extra_sets: list[str] | None = None) -> dict:
    if quick:
        for k, v in QUICK.items():
            setattr(spec, k, v)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    shards, heldout = _prepare_data(spec, out)
    from ..tracking import Tracker, read_record
    previous_id = (read_record(out / "parent") or {}).get("run_id")
    parent = Tracker(enabled=True, run_dir=out / "parent", experiment=spec.name,
                     run_name=f"{spec.name} (all arms)", uri=None,
                     run_id=previous_id,
                     tags={"maskdm.kind": "experiment"}, log=print)
    parent_id, uri = parent.wait_started(), parent.uri
    base = [f"data.shards={shards}", f"data.image_size={spec.size}", f"eval.heldout={heldout}",
            f"eval.score_ref={heldout}", f"tracking.experiment={spec.name}",
            f"tracking.uri={uri}", "tracking.enabled=true"]
    if parent_id:
        base.append(f"tracking.parent_run_id={parent_id}")
    if spec.score_samples:
        base.append(f"eval.score_samples={spec.score_samples}")
    if spec.sample_steps:
        base.append(f"eval.steps={spec.sample_steps}")
    base += list(spec.sets) + list(extra_sets or [])
    _check_same_plan(spec, out, base)
    runs = plan(spec, out, base)
    if previous_id is None:  # MLflow refuses a changed param value: log them once
        parent.log_params({"budget_steps": spec.budget_steps, "switch": spec.switch,
                           "evals": spec.evals, "train_config": str(spec.train_config),
                           "arms": json.dumps({a.name: a.as_dict() for a in spec.arms}),
                           "quick": quick})
    walls = _load_walls(out)
    for stages in runs:
        for st in stages:
            key = f"{st.arm}/seed{st.seed}/{st.stage}"
            if _finished(st):
                print(f"=== {st.label}: already finished ({st.run_dir})", flush=True)
                continue
            sets = base + st.sets + [f"train.steps={st.steps}",
                                     f"eval.score_every={st.score_every}",
                                     f"tracking.run_name={st.arm} seed {st.seed} ({st.stage})"]
            walls[key] = walls.get(key, 0.0) + _train(spec, st, sets,
                                                      st.run_dir.parent / f"{st.stage}.log")
            atomic_write_json(out / "wall_seconds.json", walls)
    results = summarize(spec, runs, walls, quick=quick)
    results["wall_seconds"] = time.time() - t_all
    write_outputs(results, out)
    for arm, per_metric in results["speedup"].items():
        parent.log_metrics({f"speedup_{arm}_{m}": s["mean"] for m, s in per_metric.items()
                            if math.isfinite(s["mean"])}, 0)
    for f in ("results.json", "results.md", "curves.png"):
        parent.log_artifact(out / f)
    parent.finish("FINISHED")
    from ..tracking import ui_command
    print(f"\n{(out / 'results.md').read_text()}\nresults: {out / 'results.json'}, "
          f"{out / 'results.md'}, plot {out / 'curves.png'}\nMLflow: experiment '{spec.name}' "
          f"(every run nested under the experiment's run): "
          f"{ui_command(uri, parent.experiment_id)}")
    return results


def _check_same_plan(spec: Spec, out: Path, base: list[str]) -> None:
    """A folder holds one plan: continuing it with other settings would mix runs of different
    budgets. More seeds and more arms are fine (the finished runs are kept); an arm that exists
    must be unchanged."""
    now = {"budget_steps": spec.budget_steps, "switch": spec.switch, "evals": spec.evals,
           "arms": {a.name: a.as_dict() for a in spec.arms},
           "train_config": str(spec.train_config),
           "sets": [s for s in base if not s.startswith("tracking.parent_run_id=")]}
    path = out / "plan.json"
    if path.exists():
        before = json.loads(path.read_text())
        # plans written before arms had more than a mask hold {name: mask}
        before["arms"] = {n: a if "mask" in a else {"mask": a}
                          for n, a in before.get("arms", {}).items()}
        diff = sorted(k for k in set(now) | set(before)
                      if k != "arms" and now.get(k) != before.get(k))
        diff += [f"arm {n}" for n, a in before["arms"].items()
                 if n in now["arms"] and now["arms"][n] != a]
        if diff:
            raise ExperimentError(f"{out} holds an experiment with other settings "
                                  f"({', '.join(diff)} differ); use another --out, or the "
                                  f"settings it was run with")
        added = [n for n in now["arms"] if n not in before["arms"]]
        if not added:
            return
        print(f"{out}: adding arm(s) {', '.join(added)}; the finished runs of the others are "
              f"kept", flush=True)
        now["arms"] = {**before["arms"], **now["arms"]}
    atomic_write_json(path, now)


def _load_walls(out: Path) -> dict:
    try:
        return json.loads((out / "wall_seconds.json").read_text())
    except (OSError, ValueError):
        return {}


def summarize(spec: Spec, runs: list[list[Stage]], walls: dict, *, quick: bool) -> dict:
    curves: dict[str, dict[str, dict[int, Curve]]] = {m: {} for m in METRICS}
    budget: dict[str, dict[int, float]] = {}
    for stages in runs:
        arm, seed = stages[0].arm, stages[0].seed
        budget.setdefault(arm, {})[seed] = sum(s.steps * s.flops_per_step for s in stages)
        for m in METRICS:
            try:
                curves[m].setdefault(arm, {})[seed] = read_curve([s.run_dir for s in stages], m)
            except ValueError:
                pass  # this metric was not logged (e.g. no held-out set)
    ref = spec.reference.name
    out = {"name": spec.name, "quick": quick, "metric": spec.metric,
           "budget_steps": spec.budget_steps, "switch": spec.switch, "seeds": spec.seeds,
           "arms": {a.name: {**a.as_dict(), "two_stage": a.two_stage,
                             "stages": [{"stage": s.stage, "steps": s.steps,
                                         "flops_per_step": s.flops_per_step}
                                        for s in next(r for r in runs if r[0].arm == a.name)]}
                    for a in spec.arms},
           "train_flops": budget, "curves": {}, "final": {}, "speedup": {},
           "run_wall_seconds": walls}
    for m, per_arm in curves.items():
        out["curves"][m] = {a: {str(s): {"flops": c.flops, "values": c.values}
                                for s, c in per_seed.items()} for a, per_seed in per_arm.items()}
        out["final"][m] = {a: spread([c.final for c in per_seed.values()])
                           for a, per_seed in per_arm.items()}
        if ref not in per_arm:
            continue
        for a, per_seed in per_arm.items():
            if a != ref:
                out["speedup"].setdefault(a, {})[m] = summarize_speedups(
                    [(per_arm[ref][s], c) for s, c in per_seed.items() if s in per_arm[ref]],
                    list(per_arm[ref].values()))
    return out


def table(results: dict) -> str:
    """The markdown table: final metrics (mean, min-max over seeds) and speed-ups per arm."""
    metrics = [m for m in METRICS if results["final"].get(m)]
    arms = list(results["arms"])
    head = ("| arm | training FLOPs | wall s / seed | " +
            " | ".join(f"final {m}" for m in metrics) + " | " +
            " | ".join(f"speed-up ({m})" for m in metrics) + " |")
    lines = [head, "|" + "---|" * (3 + 2 * len(metrics))]
    walls = results.get("run_wall_seconds", {})
    for a in arms:
        flops = list(results["train_flops"].get(a, {}).values())
        wall = sum(v for k, v in walls.items() if k.startswith(a + "/"))
        cells = [a + (" (reference)" if not results["arms"][a]["two_stage"] else ""),
                 f"{sum(flops) / max(len(flops), 1):.3g}",
                 f"{wall / len(results['seeds']):.0f}" if wall else "-"]
        cells += [format_value(results["final"][m].get(a), 4 if m == "heldout_loss" else 2)
                  for m in metrics]
        cells += ["1" if not results["arms"][a]["two_stage"] else
                  format_value(results["speedup"].get(a, {}).get(m), 2) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = results["seeds"]
    lines.append("")
    lines.append(f"{len(seeds)} seed(s) {seeds}; values are the mean over seeds with the range in "
                 f"parentheses. Speed-up: the FLOPs DSM from scratch needs to reach the worse of "
                 f"the two final values / the FLOPs the arm needs (> 1: the arm is faster), "
                 f"paired by seed; >= / <=: a bound (an arm was already there at its first "
                 f"evaluation; ~: a bound for some seeds); n/r: not resolved (along DSM "
                 f"from scratch this metric improves less than its final values differ "
                 f"between seeds). Metrics are "
                 f"lower-is-better, x 1e3 for SWD. Wall time: training + scoring + start-up, "
                 f"as run here.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in METRICS if results["curves"].get(m)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], metrics):
        for i, (arm, per_seed) in enumerate(results["curves"][m].items()):
            for j, (seed, c) in enumerate(per_seed.items()):
                ax.plot(c["flops"], c["values"], "-o", ms=3, color=colors[i % len(colors)],
                        alpha=0.9 if j == 0 else 0.5, label=arm if j == 0 else None)
            stages = results["arms"][arm]["stages"]
            if len(stages) > 1:
                switch = stages[0]["steps"] * stages[0]["flops_per_step"]
                ax.axvline(switch, color=colors[i % len(colors)], ls=":", lw=1)
        ax.set_xlabel("cumulative training FLOPs (pre-training included)")
        ax.set_ylabel(m + (" (x 1e3)" if m.startswith("swd") else ""))
        ax.set_title(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['name']}: equal-FLOP comparison (dotted: the switch from pre-training to DSM)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_outputs(results: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table(results) + "\n")
    plot(results, out / "curves.png")
