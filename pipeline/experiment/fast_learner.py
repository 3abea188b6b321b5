"""``maskdm experiment fast-learner``: does MSM pre-training make diffusion training faster?

The arms and their equal-FLOP plan are in ``arms.py`` (the reference DSM from scratch, two-stage
arms, and the DSM controls that match a two-stage arm's step count or images). Each stage is an
ordinary ``maskdm train`` run, so the experiment exercises the real pipeline (shards, loader,
DeepSpeed, EMA, checkpoints, MLflow).

All runs log the weight-free metrics (``eval.score_every``) against a held-out set at points
evenly spaced in FLOPs, together with ``train_flops``. The result (``OUT/results.json``,
``OUT/results.md``, ``OUT/curves.png``) compares the arms per seed at equal FLOPs and reports the
speed-up of each arm over the reference (``compare.speedup``) with its spread over seeds and its
bracket from the evaluation grid. Every run goes into one MLflow experiment, nested under a parent
run that gets the table and the plot.

Re-running the same command continues where it stopped: finished runs are kept, an interrupted
one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from maskdm.console import show_progress
from maskdm.shardformat.fsutil import atomic_write_json, atomic_write_text

from ..config import ConfigError
from .arms import METRICS, Spec, Stage, plan  # noqa: F401  (Spec: the CLI's entry)
from .compare import Curve, format_value, save_figure, spread, summarize_speedups

QUICK = {"budget_steps": 24, "evals": 2, "seeds": [0], "count": 192, "heldout_count": 32,
         "score_samples": 16, "sample_steps": 5}


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


def read_curve(runs: list[tuple[Path, str]], metric: str) -> Curve:
    """The evaluation points of one arm -> Curve over train_flops; ``runs``: its (run folder,
    stage label) in order, the label saying which model scored each point."""
    from ..tracking import read_jsonl
    flops, values, stages = [], [], []
    for run, stage in runs:
        points = {}
        for r in read_jsonl(run / "metrics.jsonl"):
            if metric in r and "train_flops" in r:
                points[int(r["step"])] = (float(r["train_flops"]), float(r[metric]))
        for step in sorted(points):  # a resumed run may log a step twice: the last one counts
            flops.append(points[step][0])
            values.append(points[step][1])
            stages.append(stage)
    return Curve(flops, values, stages)


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


def run(spec: Spec, out: Path, *, quick: bool = False, extra_sets: list[str] | None = None,
        only: list[str] | None = None, report: bool = False) -> dict:
    """Train what is missing (``only``: just these arms), then write the results of every
    finished run. ``report``: train nothing, write the results of the runs finished so far."""
    if quick:
        for k, v in QUICK.items():
            setattr(spec, k, v)
    unknown = sorted(set(only or []) - {a.name for a in spec.arms})
    if unknown:
        raise ExperimentError(f"--arms: no arm {', '.join(unknown)} in the experiment file "
                              f"(its arms: {', '.join(a.name for a in spec.arms)})")
    out = out.resolve()
    if report:
        return _report(spec, out, extra_sets or [], quick)
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
    base = _base_sets(spec, shards, heldout, uri, parent_id, extra_sets or [])
    _check_same_plan(spec, out, base)
    runs = plan(spec, out, base)
    if previous_id is None:  # MLflow refuses a changed param value: log them once
        parent.log_params({"budget_steps": spec.budget_steps, "switch": spec.switch,
                           "evals": spec.evals, "train_config": str(spec.train_config),
                           "arms": json.dumps({a.name: a.as_dict() for a in spec.arms}),
                           "quick": quick})
    walls = _load_walls(out)
    for stages in runs:
        if only and stages[0].arm not in only:
            continue
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


def _base_sets(spec: Spec, shards: str, heldout: str, uri: str | None, parent_id: str | None,
               extra_sets: list[str]) -> list[str]:
    """The overrides every run of this experiment gets."""
    base = [f"data.shards={shards}", f"data.image_size={spec.size}", f"eval.heldout={heldout}",
            f"eval.score_ref={heldout}", f"tracking.experiment={spec.name}",
            f"tracking.uri={uri}", "tracking.enabled=true"]
    if parent_id:
        base.append(f"tracking.parent_run_id={parent_id}")
    if spec.score_samples:
        base.append(f"eval.score_samples={spec.score_samples}")
    if spec.sample_steps:
        base.append(f"eval.steps={spec.sample_steps}")
    return base + list(spec.sets) + list(extra_sets)


def _report(spec: Spec, out: Path, extra_sets: list[str], quick: bool) -> dict:
    """``--report``: the results of the runs finished so far, nothing trained or logged."""
    from ..tracking import read_record
    record = read_record(out / "parent")
    if record is None or not (out / "plan.json").exists():
        raise ExperimentError(f"{out}: no experiment has run there yet (run it without --report "
                              f"first)")
    data = out / "data"
    heldout = spec.heldout or str(data / "heldout")
    shards = spec.shards or str(data / "train")
    base = _base_sets(spec, shards, heldout, record.get("uri"), record.get("run_id"),
                      extra_sets)
    _check_same_plan(spec, out, base)
    results = summarize(spec, plan(spec, out, base), _load_walls(out), quick=quick)
    if spec.reference.name not in results["arms"]:
        print(f"note: the reference arm {spec.reference.name} has no finished run yet: no "
              f"speed-ups", flush=True)
    write_outputs(results, out)
    print(f"{(out / 'results.md').read_text()}\nresults so far: {out / 'results.json'}, "
          f"{out / 'results.md'}, plot {out / 'curves.png'}", flush=True)
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
    """The results of the finished runs (an arm's unfinished seeds, and arms with none
    finished, are left out; each arm lists the seeds it has)."""
    runs = [stages for stages in runs if all(_finished(st) for st in stages)]
    by_arm: dict[str, list[list[Stage]]] = {}
    for stages in runs:
        by_arm.setdefault(stages[0].arm, []).append(stages)
    curves: dict[str, dict[str, dict[int, Curve]]] = {m: {} for m in METRICS}
    budget: dict[str, dict[int, float]] = {}
    for stages in runs:
        arm, seed = stages[0].arm, stages[0].seed
        budget.setdefault(arm, {})[seed] = sum(s.steps * s.flops_per_step for s in stages)
        for m in METRICS:
            try:
                labels = [s.stage for s in stages] if len(stages) > 1 else ["dsm"]
                curves[m].setdefault(arm, {})[seed] = read_curve(
                    [(s.run_dir, label) for s, label in zip(stages, labels)], m)
            except ValueError:
                pass  # this metric was not logged (e.g. no held-out set)
    ref = spec.reference.name
    out = {"name": spec.name, "quick": quick, "metric": spec.metric,
           "budget_steps": spec.budget_steps, "switch": spec.switch, "seeds": spec.seeds,
           "arms": {a.name: {**a.as_dict(), "two_stage": a.two_stage,
                             "reference": a.is_reference,
                             "seeds": [r[0].seed for r in by_arm[a.name]],
                             "stages": [{"stage": s.stage, "steps": s.steps,
                                         "flops_per_step": s.flops_per_step,
                                         "batch": s.batch}
                                        for s in by_arm[a.name][0]]}
                    for a in spec.arms if a.name in by_arm},
           "train_flops": budget, "curves": {}, "final": {}, "speedup": {},
           "run_wall_seconds": walls}
    for m, per_arm in curves.items():
        out["curves"][m] = {a: {str(s): {"flops": c.flops, "values": c.values,
                                         "stages": c.stages}
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
    """The markdown table: steps, images, FLOPs, final metrics (mean, min-max over seeds) and
    speed-ups per arm."""
    metrics = [m for m in METRICS if results["final"].get(m)]
    arms = list(results["arms"])
    head = ("| arm | seeds | steps (batch) | images | training FLOPs | wall s / seed | " +
            " | ".join(f"final {m}" for m in metrics) + " | " +
            " | ".join(f"speed-up ({m})" for m in metrics) + " |")
    lines = [head, "|" + "---|" * (6 + 2 * len(metrics))]
    walls = results.get("run_wall_seconds", {})
    for a in arms:
        info = results["arms"][a]
        flops = list(results["train_flops"].get(a, {}).values())
        seeds = info.get("seeds", results["seeds"])
        stages = info["stages"]
        wall = sum(walls.get(f"{a}/seed{x}/{s['stage']}", 0.0) for x in seeds for s in stages)
        steps = " + ".join(f"{s['steps']}" for s in stages) + \
            f" ({'/'.join(sorted({str(s.get('batch') or '-') for s in stages}))})"
        images = sum(s["steps"] * (s.get("batch") or 0) for s in stages)
        cells = [a + (" (reference)" if info.get("reference") else ""),
                 ",".join(str(x) for x in seeds), steps,
                 f"{images / 1000:.1f}k" if images else "-",
                 f"{sum(flops) / max(len(flops), 1):.3g}",
                 f"{wall / max(len(seeds), 1):.0f}" if wall else "-"]
        cells += [format_value(results["final"][m].get(a), 4 if m == "heldout_loss" else 2)
                  for m in metrics]
        cells += ["1" if info.get("reference") else
                  format_value(results["speedup"].get(a, {}).get(m), 2) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Seeds: the finished ones per arm (the plan: {results['seeds']}); final values are the "
        f"fine-tuned (or only) model's, mean over seeds with the range in parentheses; lower is "
        f"better, SWD x 1e3. Speed-up, paired by seed: for an arm that ends at least as good as "
        f"DSM from scratch, the FLOPs scratch needs to reach its final value and stay there / the "
        f"FLOPs the arm needs to reach it and stay; for an arm that ends worse, the FLOPs scratch "
        f"needs to reach the arm's final value / all of the arm's FLOPs (so <= 1). The mean over "
        f"seeds is followed by [lo, hi]: what the evaluation points and the seeds allow (the "
        f"crossing lies between two points); >= lo: no upper end (the arm was there at its first "
        f"point); (pre): the arm got there with its pre-trained model, before fine-tuning; n/r: "
        f"not resolved (along scratch this metric improves less than its final values differ "
        f"between seeds). Wall time: training + scoring + start-up, as run here.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Metrics against FLOPs, one panel per metric: filled markers for DSM models (fine-tuned or
    from scratch), hollow ones for the pre-trained (masked) models, evaluated unmasked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in METRICS if results["curves"].get(m)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    for ax, m in zip(axes[0], metrics):
        for i, (arm, per_seed) in enumerate(results["curves"][m].items()):
            color, ls = colors[i % len(colors)], styles[i // len(colors) % len(styles)]
            for j, (seed, c) in enumerate(per_seed.items()):
                alpha = 0.9 if j == 0 else 0.5
                ax.plot(c["flops"], c["values"], ls, color=color, alpha=alpha,
                        label=arm if j == 0 else None)
                stages = c.get("stages") or ["dsm"] * len(c["flops"])
                for pre in (True, False):
                    pts = [(f, v) for f, v, s in zip(c["flops"], c["values"], stages)
                           if (s == "pretrain") == pre]
                    if pts:
                        ax.plot(*zip(*pts), "o", ms=4, color=color, alpha=alpha,
                                markerfacecolor="none" if pre else color)
            stages = results["arms"][arm]["stages"]
            if len(stages) > 1:
                switch = stages[0]["steps"] * stages[0]["flops_per_step"]
                ax.axvline(switch, color=color, ls=":", lw=1)
        ax.set_xlabel("cumulative training FLOPs (pre-training included)")
        ax.set_ylabel(m + (" (x 1e3, log scale)" if m.startswith("swd") else ""))
        if m.startswith("swd"):  # an arm far off (e.g. early MaskDiT) would flatten the others
            ax.set_yscale("log")
        ax.set_title(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['name']}: equal-FLOP comparison (hollow: the pre-trained model, "
                 f"evaluated unmasked; dotted: the switch to DSM)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_outputs(results: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table(results) + "\n")
    plot(results, out / "curves.png")
