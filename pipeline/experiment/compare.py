"""Curves of a metric against cumulative training FLOPs, and the speed-up between two of them.

Every metric here is lower-is-better (SWD, held-out loss, FID). A curve is the metric at the
evaluation points of one arm, pre-training included, in FLOP order.

Speed-up of arm A over the reference arm R (DSM from scratch) at their final values: take the
worse of the two final values, ``target = max(final_R, final_A)``; the speed-up is the FLOPs R
needs to first reach ``target`` divided by the FLOPs A needs to first reach it (linear
interpolation between evaluation points). When A ends better than R, that is "the FLOPs the
scratch arm needs to reach its final metric / the FLOPs the two-stage arm needs to reach the same
value" (> 1); when A ends worse, the same rule gives a value < 1 instead of "never".

Two limits of a speed-up read off evaluation points, reported with it (``speedup_detail``):
- resolution: a curve can only reach the target at an evaluation point or between two; when an
  arm is already at the target at its first point, the true crossing may be earlier, so the ratio
  is a bound (>= when it is the two-stage arm, <= when it is the reference);
- noise: when the reference arm's metric does not improve along its curve by more than its final
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

    def __post_init__(self):
        if len(self.flops) != len(self.values) or not self.flops:
            raise ValueError("a curve needs one value per FLOP count, and at least one point")
        if any(b < a for a, b in zip(self.flops, self.flops[1:])):
            raise ValueError("a curve's FLOP counts must not decrease")

    @property
    def final(self) -> float:
        return self.values[-1]


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


def speedup(reference: Curve, arm: Curve) -> float:
    """FLOPs ``reference`` needs / FLOPs ``arm`` needs to reach the worse of the two final
    values (> 1: ``arm`` is faster)."""
    target = max(reference.final, arm.final)
    f_ref, f_arm = first_reach(reference, target), first_reach(arm, target)
    if not f_arm:  # reached at zero FLOPs (a curve starting at its target): no finite ratio
        return math.inf if f_ref else 1.0
    return f_ref / f_arm


def speedup_detail(reference: Curve, arm: Curve) -> tuple[float, str]:
    """``speedup`` and whether it is ``exact``, a ``lower bound`` or an ``upper bound`` (a curve
    at the target at its first evaluation point)."""
    value = speedup(reference, arm)
    target = max(reference.final, arm.final)
    arm_first = arm.values[0] <= target
    ref_first = reference.values[0] <= target
    if arm_first and not ref_first:
        return value, "lower bound"
    if ref_first and not arm_first:
        return value, "upper bound"
    return value, "exact"


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
    """Speed-ups of (reference, arm) curve pairs, one per seed -> spread + per-seed values, how
    they were read (``kind``: exact, lower bound, upper bound, or mixed over seeds) and whether
    the reference resolves them."""
    detail = [speedup_detail(ref, arm) for ref, arm in pairs]
    kinds = {k for _, k in detail}
    return {**spread([v for v, _ in detail]), "per_seed": [v for v, _ in detail],
            "kind": kinds.pop() if len(kinds) == 1 else "mixed",
            "resolved": resolved_by(references)}


def format_value(s: dict | None, digits: int) -> str:
    """``mean (min-max)`` of a ``spread`` (``mean`` alone for one seed); a speed-up summary
    gets its mark: ``>=``/``<=`` a bound, ``~`` bounds for some seeds, ``n/r`` not resolved."""
    if not s or not math.isfinite(s["mean"]):
        return "-"
    if s.get("resolved") is False:
        return "n/r"
    mark = {"lower bound": ">=", "upper bound": "<=", "mixed": "~"}.get(s.get("kind"), "")
    if s["n"] > 1:
        return f"{mark}{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
    return f"{mark}{s['mean']:.{digits}f}"


def save_figure(fig, path, dpi: int) -> None:
    """A matplotlib figure -> PNG at ``path``, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    from maskdm.shardformat.fsutil import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
