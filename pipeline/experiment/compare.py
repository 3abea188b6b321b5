"""Curves of a metric against cumulative training FLOPs, and the speed-up between two of them.

Every metric here is lower-is-better (SWD, held-out loss, FID). A curve is the metric at the
evaluation points of one arm, pre-training included, in FLOP order; each point knows which model
it scored (``stages``: the pre-trained, e.g. masked, model or the fine-tuned one).

Speed-up of arm A over the reference arm R (DSM from scratch), by construction never above 1 for
an arm that ends worse:

- A ends at least as good as R: the target is R's final value; the speed-up is the FLOPs R needs
  to *reach and stay* at or below it (until its end) over the FLOPs A needs to reach and stay
  there (> 1: A is faster). "And stay" matters for curves that are not monotone: a point that
  dips below the target and comes back up does not count.
- A ends worse: the target is A's final value; the speed-up is the FLOPs R needs to reach and stay
  there over *all* of A's FLOPs (<= 1 whenever A spent at least R's FLOPs: equal budgets).

Two limits of a speed-up read off evaluation points, reported with it:
- resolution: the crossing lies somewhere between the last evaluation point above the target and
  the next one (between 0 and the first point when a curve is there from its first point), so
  each speed-up comes with a bracket ``[lo, hi]`` (``hi`` infinite: a lower bound) next to the
  interpolated value;
- noise: when the reference's metric does not improve along its curve by more than its final
  values differ between seeds, "the FLOPs it needs to reach its final value" is set by noise, and
  the speed-up is reported as not resolved (``resolved_by``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Curve:
    flops: list[float]
    values: list[float]
    stages: list[str] | None = None  # per point: "pretrain" | "finetune" | "dsm" (None: dsm)

    def __post_init__(self):
        if len(self.flops) != len(self.values) or not self.flops:
            raise ValueError("a curve needs one value per FLOP count, and at least one point")
        if any(b < a for a, b in zip(self.flops, self.flops[1:])):
            raise ValueError("a curve's FLOP counts must not decrease")
        if self.stages is not None and len(self.stages) != len(self.flops):
            raise ValueError("a curve needs one stage per point")

    @property
    def final(self) -> float:
        return self.values[-1]

    def stage(self, i: int) -> str:
        return self.stages[i] if self.stages else "dsm"


@dataclass
class Crossing:
    """Where a curve gets to a target for good: ``flops`` (interpolated), ``lo``/``hi`` (the
    evaluation points around it), ``index`` (the first point at or below it for good)."""

    flops: float
    lo: float
    hi: float
    index: int


def first_reach(curve: Curve, target: float) -> float | None:
    """FLOPs at which ``curve`` first gets to ``target`` or below (interpolated); None if never."""
    prev_f, prev_v = None, None
    for f, v in zip(curve.flops, curve.values):
        if v <= target:
            if prev_v is None or not math.isfinite(prev_v) or prev_v == v:
                return f
            return prev_f + (f - prev_f) * (prev_v - target) / (prev_v - v)
        prev_f, prev_v = f, v
    return None


def reach_and_stay(curve: Curve, target: float) -> Crossing | None:
    """From which FLOPs on ``curve`` stays at or below ``target`` until its end; None if it ends
    above. Interpolated between the last point above and the next one."""
    if not curve.final <= target:
        return None
    above = [i for i, v in enumerate(curve.values) if not v <= target]
    if not above:
        return Crossing(curve.flops[0], 0.0, curve.flops[0], 0)
    i = above[-1]
    (f0, v0), (f1, v1) = (curve.flops[i], curve.values[i]), (curve.flops[i + 1],
                                                              curve.values[i + 1])
    f = f1 if not math.isfinite(v0) or v0 == v1 else f0 + (f1 - f0) * (v0 - target) / (v0 - v1)
    return Crossing(f, f0, f1, i + 1)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def speedup_detail(reference: Curve, arm: Curve) -> dict:
    """The speed-up of ``arm`` over ``reference`` (see the module): ``value``, its bracket
    ``lo``/``hi`` from the evaluation points, ``kind`` (``exact``, or ``lower bound`` when ``hi``
    is infinite), and ``reached_in``: which model of the arm got there (``pretrain``,
    ``finetune``, ``dsm`` for a one-stage arm, or ``end`` when it ends worse and is charged all
    its FLOPs)."""
    if arm.final <= reference.final:
        target = reference.final
        r, a = reach_and_stay(reference, target), reach_and_stay(arm, target)
        value = _ratio(r.flops, a.flops)
        lo, hi = _ratio(r.lo, a.hi), _ratio(r.hi, a.lo)
        reached = arm.stage(a.index)
    else:
        target = arm.final
        r, end = reach_and_stay(reference, target), arm.flops[-1]
        value, lo, hi = _ratio(r.flops, end), _ratio(r.lo, end), _ratio(r.hi, end)
        reached = "end"
    return {"value": value, "lo": lo, "hi": hi,
            "kind": "lower bound" if math.isinf(hi) else "exact", "reached_in": reached,
            "target": target}


def speedup(reference: Curve, arm: Curve) -> float:
    """The interpolated speed-up (``speedup_detail``'s value)."""
    return speedup_detail(reference, arm)["value"]


def resolved_by(references: list[Curve]) -> bool:
    """Does the reference arm's metric improve by more than seed noise? The mean drop from the
    first evaluation to the final value must exceed the range of the final values over seeds
    (with one seed: any drop)."""
    drops = [c.values[0] - c.final for c in references]
    finals = [c.final for c in references]
    noise = max(finals) - min(finals) if len(finals) > 1 else 0.0
    return sum(drops) / len(drops) > noise


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over seeds (geometric mean for ratios would hide nothing at n=2)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": len(values)}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite),
            "n": len(values)}


def summarize_speedups(pairs: list[tuple[Curve, Curve]], references: list[Curve]) -> dict:
    """Speed-ups of (reference, arm) curve pairs, one per seed -> spread of the values, the
    bracket over seeds and evaluation grid (``lo``: the smallest per-seed ``lo``, ``hi``: the
    largest ``hi``), per-seed details, ``kind`` (a lower bound if any seed's is), ``reached_in``
    (``mixed`` when seeds differ) and whether the reference resolves them."""
    detail = [speedup_detail(ref, arm) for ref, arm in pairs]
    reached = {d["reached_in"] for d in detail}
    return {**spread([d["value"] for d in detail]), "per_seed": detail,
            "lo": min((d["lo"] for d in detail), default=math.nan),
            "hi": max((d["hi"] for d in detail), default=math.nan),
            "kind": "lower bound" if any(d["kind"] == "lower bound" for d in detail) else "exact",
            "reached_in": reached.pop() if len(reached) == 1 else "mixed",
            "resolved": resolved_by(references)}


def format_value(s: dict | None, digits: int) -> str:
    """``mean (min-max)`` of a ``spread`` (``mean`` alone for one seed). A speed-up summary is
    ``mean [lo, hi]`` (the bracket over seeds and the evaluation grid; ``>= lo`` when it has no
    upper end), ``n/r`` when not resolved, and ``(pre)`` when the arm got there with its
    pre-trained model."""
    if not s or not math.isfinite(s["mean"]):
        return "-"
    if s.get("resolved") is False:
        return "n/r"
    if "lo" in s:
        pre = " (pre)" if s.get("reached_in") in ("pretrain", "mixed") and \
            any(d["reached_in"] == "pretrain" for d in s["per_seed"]) else ""
        if math.isinf(s["hi"]):
            return f">= {s['lo']:.{digits}f}{pre}"
        return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]{pre}"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
    return f"{s['mean']:.{digits}f}"


def save_figure(fig, path, dpi: int) -> None:
    """A matplotlib figure -> PNG at ``path``, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    from maskdm.shardformat.fsutil import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
