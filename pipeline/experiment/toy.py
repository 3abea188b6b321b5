"""``maskdm experiment toy``: the paper's Fig. 2 toy with maskdm's model, objective and diffusion.

A point is a tiny 1 x d "image" with one channel; with patch size 1 each coordinate is a token.
MSM with S visible coordinates learns the S-dimensional marginals of the data (the "marginal
proxy distribution" of the paper): the Swiss roll in 2-D with S = 1 (each coordinate alone), a
3-D "rose" with S = 2 (each pair of coordinates). Then DSM fine-tuning from the MSM weights is
compared with DSM from scratch at equal training FLOPs (``model/flops.py``), on

- SWD: the sliced Wasserstein distance between ``samples`` generated points and as many held-out
  points (lower is better);
- curve distance: the mean Euclidean distance of the generated points to the noiseless curve.

The rose is our own construction (the paper does not give its formula): the 4-petal rhodonea
r = cos(2 theta) in the x-y plane, lifted to z = 0.8 r^2 - 0.4 so that every pair of coordinates
has a different 2-D marginal. The Swiss roll is the usual t (cos t, sin t), t in [1.5 pi, 4.5 pi].
Both are scaled into [-1, 1]. Plain PyTorch on one process (no DeepSpeed: the toy is about the
objective, and a step takes milliseconds).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from maskdm.model.config import ModelConfig
from maskdm.model.diffusion import GaussianDiffusion
from maskdm.model.flops import step_flops
from maskdm.model.masks import MaskSpec, sample_keep_idx
from maskdm.model.objective import DiffusionObjective
from maskdm.model.uvit import UViT
from maskdm.shardformat.fsutil import atomic_write_json, atomic_write_text

from ..ema import EMA
from .compare import Curve, format_value, save_figure, spread, summarize_speedups

SHAPES = {"swissroll": (2, 1), "rose": (3, 2)}  # dimension, coordinates visible under MSM (S)


def curve_points(shape: str, u: np.ndarray) -> np.ndarray:
    """Points of the noiseless curve at parameters ``u`` in [0, 1) -> [len(u), d]."""
    if shape == "swissroll":
        t = (1.5 + 3.0 * u) * math.pi
        return np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (4.5 * math.pi) * 0.9
    if shape == "rose":
        th = 2 * math.pi * u
        r = np.cos(2 * th)
        return np.stack([r * np.cos(th), r * np.sin(th), 0.8 * r ** 2 - 0.4], axis=1) * 0.9
    raise ValueError(f"unknown toy shape {shape!r}; choose one of {', '.join(SHAPES)}")


def sample_points(shape: str, n: int, seed: int, noise: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = curve_points(shape, rng.random(n))
    return (pts + noise * rng.standard_normal(pts.shape)).astype(np.float32)


def curve_distance(points: np.ndarray, shape: str, resolution: int = 20000) -> float:
    """Mean distance of ``points`` to the noiseless curve (nearest of ``resolution`` points)."""
    curve = torch.from_numpy(curve_points(shape, np.arange(resolution) / resolution)).float()
    pts = torch.as_tensor(points).float()
    best = [torch.cdist(pts[i:i + 1024], curve).min(dim=1).values for i in range(0, len(pts), 1024)]
    return float(torch.cat(best).mean())


@dataclass
class ToySettings:
    steps: int = 3000  # the DSM-from-scratch budget, in steps
    batch: int = 256
    switch: float = 0.5  # fraction of the FLOPs spent on MSM pre-training in the two-stage arm
    evals: int = 4
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    lr: float = 1e-3
    ema_decay: float = 0.995
    samples: int = 10000  # generated and held-out points per evaluation
    sampler_steps: int = 25  # DDIM steps (eta 1); 10k points x 25 steps is ~20 s on one core
    train_points: int = 20000
    depth: int = 4
    dim: int = 64
    heads: int = 4


QUICK = dict(steps=40, evals=2, seeds=[0], samples=500, sampler_steps=10, train_points=2000)


def model_config(shape: str, s: ToySettings) -> ModelConfig:
    d = SHAPES[shape][0]
    return ModelConfig(preset="toy", depth=s.depth, dim=s.dim, heads=s.heads, in_channels=1,
                       input_size=1, input_width=d, patch_size=1, attention="sdpa").resolved()


def msm_spec(shape: str) -> MaskSpec:
    d, visible = SHAPES[shape]
    return MaskSpec("patch", ratio=(d - visible) / d)


class _Arm:
    """One arm of one seed: trains through its stages and records its evaluation points."""

    def __init__(self, shape, s: ToySettings, seed: int, train: torch.Tensor, held: np.ndarray,
                 diffusion: GaussianDiffusion):
        self.shape, self.s, self.seed = shape, s, seed
        self.mcfg = model_config(shape, s)
        torch.manual_seed(seed)
        self.net = UViT(self.mcfg)
        self.train, self.held, self.diffusion = train, held, diffusion
        self.objective = DiffusionObjective(diffusion, 1)
        self.gen = torch.Generator().manual_seed(seed + 1000)
        self.flops, self.points, self.snapshots = 0.0, [], {}

    def evaluate(self, net) -> dict:
        g = torch.Generator().manual_seed(12345)  # the same noise for every evaluation
        d = SHAPES[self.shape][0]
        net.eval()
        with torch.no_grad():
            x = self.diffusion.sample(net, (self.s.samples, 1, 1, d), sampler="ddim",
                                      steps=self.s.sampler_steps, eta=1.0, generator=g,
                                      clip=False)
        net.train()
        pts = x.reshape(len(x), d).numpy()
        return {"flops": self.flops, "swd": _swd(pts, self.held),
                "curve_distance": curve_distance(pts, self.shape), "_points": pts}

    def stage(self, spec: MaskSpec, steps: int, eval_every: int, tag: str) -> None:
        s, net = self.s, self.net
        opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=0.0)
        ema = EMA(net, s.ema_decay)
        per_step = float(step_flops(self.mcfg, spec, s.batch))
        d = SHAPES[self.shape][0]
        shadow = UViT(self.mcfg)
        for step in range(1, steps + 1):
            idx = torch.randint(len(self.train), (s.batch,), generator=self.gen)
            x0 = self.train[idx].reshape(s.batch, 1, 1, d)
            t = torch.randint(self.diffusion.num_timesteps, (s.batch,), generator=self.gen)
            noise = torch.randn(x0.shape, generator=self.gen)
            keep = sample_keep_idx(spec, s.batch, self.mcfg.grid, self.gen)
            loss = self.objective(net, SimpleNamespace(x0=x0, labels=None), keep, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(net, step)
            self.flops += per_step
            if step % eval_every == 0 or step == steps:
                shadow.load_state_dict(ema.full_state_dict())
                point = self.evaluate(shadow)
                pts = point.pop("_points")
                self.points.append({**point, "stage": tag, "step": step})
        self.snapshots[tag] = pts  # the samples at the end of this stage
        net.load_state_dict(ema.full_state_dict())  # the next stage starts from the EMA weights


def _swd(a: np.ndarray, b: np.ndarray) -> float:
    from ..eval.swd import sliced_wasserstein
    return sliced_wasserstein(a, b, directions=128, repeats=4, seed=0)


def run_shape(shape: str, s: ToySettings, log=print) -> dict:
    diffusion = GaussianDiffusion("linear", 1000)
    mcfg = model_config(shape, s)
    full = MaskSpec("none")
    msm = msm_spec(shape)
    dsm_flops = float(step_flops(mcfg, full, s.batch))
    msm_flops = float(step_flops(mcfg, msm, s.batch))
    budget = s.steps * dsm_flops
    pre = max(1, round(s.switch * budget / msm_flops))
    fine = max(1, round((budget - pre * msm_flops) / dsm_flops))
    every = max(1, round(s.steps / s.evals))
    pre_every = max(1, round(budget / s.evals / msm_flops))
    held = sample_points(shape, s.samples, seed=10_000)
    out = {"shape": shape, "dimension": SHAPES[shape][0], "visible": SHAPES[shape][1],
           "budget_flops": budget, "plan": {"scratch": [["dsm", s.steps]],
                                            "msm_dsm": [["msm", pre], ["dsm", fine]]},
           "data_floor": {"swd": _swd(sample_points(shape, s.samples, seed=20_000), held),
                          "curve_distance": curve_distance(held, shape)},
           "runs": {"scratch": {}, "msm_dsm": {}}, "wall_seconds": {}}
    snaps = {}
    for seed in s.seeds:
        train = torch.from_numpy(sample_points(shape, s.train_points, seed=seed))
        for arm in ("scratch", "msm_dsm"):
            t0 = time.time()
            a = _Arm(shape, s, seed, train, held, diffusion)
            if arm == "scratch":
                a.stage(full, s.steps, every, "dsm")
            else:
                a.stage(msm, pre, pre_every, "msm")
                a.stage(full, fine, every, "dsm")
            out["runs"][arm][str(seed)] = a.points
            out["wall_seconds"][f"{arm}/seed{seed}"] = time.time() - t0
            snaps.setdefault(arm, a.snapshots)
            last = a.points[-1]
            log(f"  {shape} seed {seed} {arm}: SWD {last['swd']:.4f}, curve distance "
                f"{last['curve_distance']:.4f} ({time.time() - t0:.0f} s)")
    out["final"], out["speedup"] = {}, {}
    for m in ("swd", "curve_distance"):
        curves = {arm: {seed: Curve([p["flops"] for p in pts], [p[m] for p in pts])
                        for seed, pts in per.items()} for arm, per in out["runs"].items()}
        out["final"][m] = {arm: spread([c.final for c in per.values()])
                           for arm, per in curves.items()}
        out["speedup"][m] = summarize_speedups(
            [(curves["scratch"][k], c) for k, c in curves["msm_dsm"].items()],
            list(curves["scratch"].values()))
    out["_snapshots"] = snaps
    return out


def figure(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(20, 4.2 * len(results)))
    for row, r in enumerate(results):
        shape, d = r["shape"], r["dimension"]
        curve = curve_points(shape, np.arange(4000) / 4000)
        snaps = r["_snapshots"]
        panels = [("MSM proxy: samples after pre-training (S=%d)" % r["visible"],
                   snaps["msm_dsm"]["msm"]),
                  ("MSM -> DSM: samples at the end", snaps["msm_dsm"]["dsm"]),
                  ("DSM from scratch: samples at the end", snaps["scratch"]["dsm"])]
        for col, (title, pts) in enumerate(panels):
            k = row * 4 + col + 1
            if d == 2:
                ax = fig.add_subplot(len(results), 4, k)
                ax.hist2d(pts[:, 0], pts[:, 1], bins=80, range=[[-1.1, 1.1], [-1.1, 1.1]],
                          cmap="Blues")
                ax.plot(curve[:, 0], curve[:, 1], "r-", lw=0.8)
                ax.set_aspect("equal")
            else:
                ax = fig.add_subplot(len(results), 4, k, projection="3d")
                ax.scatter(pts[:2000, 0], pts[:2000, 1], pts[:2000, 2], s=1, alpha=0.3)
                ax.plot(curve[:, 0], curve[:, 1], curve[:, 2], "r-", lw=0.8)
                for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
                    setter(-1.1, 1.1)
            ax.set_title(f"{shape}: {title}", fontsize=9)
        ax = fig.add_subplot(len(results), 4, row * 4 + 4)
        for arm, color in (("scratch", "C0"), ("msm_dsm", "C1")):
            for j, (seed, pts) in enumerate(r["runs"][arm].items()):
                ax.plot([p["flops"] for p in pts], [p["swd"] for p in pts], "-o", ms=3,
                        color=color, alpha=0.9 if j == 0 else 0.5,
                        label=("DSM from scratch" if arm == "scratch" else "MSM -> DSM")
                        if j == 0 else None)
        ax.axhline(r["data_floor"]["swd"], color="gray", ls="--", lw=1,
                   label="two data samples")
        ax.set_yscale("log")
        ax.set_xlabel("cumulative training FLOPs")
        ax.set_ylabel("SWD to held-out points")
        ax.set_title(f"{shape}: SWD vs FLOPs", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def table(results: list[dict]) -> str:
    lines = ["| shape | arm | final SWD | final curve distance | speed-up (SWD) | "
             "speed-up (curve distance) |", "|---|---|---|---|---|---|"]

    for r in results:
        for arm, label in (("scratch", "DSM from scratch"), ("msm_dsm", "MSM -> DSM")):
            su = ["1", "1"] if arm == "scratch" else [format_value(r["speedup"][m], 2)
                                                       for m in ("swd", "curve_distance")]
            lines.append(f"| {r['shape']} (d={r['dimension']}, S={r['visible']}) | {label} | "
                         f"{format_value(r['final']['swd'][arm], 4)} | "
                         f"{format_value(r['final']['curve_distance'][arm], 4)} | "
                         f"{su[0]} | {su[1]} |")
        lines.append(f"| {r['shape']} | two held-out samples (floor) | "
                     f"{r['data_floor']['swd']:.4f} | {r['data_floor']['curve_distance']:.4f} "
                     f"| | |")
    return "\n".join(lines)


def run(shapes: list[str], s: ToySettings, out: Path, *, quick: bool = False, log=print) -> list:
    if quick:
        s = replace(s, **QUICK)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = []
    for shape in shapes:
        log(f"=== {shape}: DSM from scratch vs MSM (S={SHAPES[shape][1]} of "
            f"{SHAPES[shape][0]}) -> DSM, {len(s.seeds)} seed(s)")
        results.append(run_shape(shape, s, log))
    figure(results, out / "toy.png")
    text = table(results)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    payload = {"settings": asdict(s), "quick": quick, "results": clean,
               "wall_seconds": time.time() - t0}
    atomic_write_json(out / "toy_results.json", payload)
    atomic_write_text(out / "toy_results.md", text + "\n")
    log(f"\n{text}\n\nSpeed-up: the FLOPs DSM from scratch needs to reach the worse of the two "
        f"final values / the FLOPs MSM -> DSM needs, paired by seed (mean, range); >= / <=: a "
        f"bound (an arm was there at its first evaluation); n/r: not resolved by the seeds.\n"
        f"figure {out / 'toy.png'}; results {out / 'toy_results.json'} "
        f"({time.time() - t0:.0f} s)")
    return results
