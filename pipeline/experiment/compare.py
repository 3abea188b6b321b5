"""Curves of a metric against cumulative training FLOPs, and the speed-up between two of them.

Every metric here is lower-is-better (SWD, held-out loss, FID). A curve is the metric at the
evaluation points of one arm, pre-training included, in FLOP order.

Speed-up of arm A over the reference arm R (DSM from scratch) at their final values: take the
worse of the two final values, ``target = max(final_R, final_A)``; the speed-up is the FLOPs R
needs to first reach ``target`` divided by the FLOPs A needs to first reach it (linear
interpolation between evaluation points). When A ends better than R, that is "the FLOPs the
scratch arm needs to reach its final metric / the FLOPs the two-stage arm needs to reach the same
value" (> 1); when A ends worse, the same rule gives a value < 1 instead of "never".
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


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over seeds (geometric mean for ratios would hide nothing at n=2)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": len(values)}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite),
            "n": len(values)}
