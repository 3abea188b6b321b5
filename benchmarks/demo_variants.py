"""The demo's settings, measured: sample quality of `maskdm demo`'s two stages under variants.

    python -m benchmarks.demo_variants --out bench_demo                  # uniform vs min_snr
    python -m benchmarks.demo_variants --out bench_demo --variants uniform,min_snr,min_snr_conv
    python -m benchmarks.demo_variants --list                            # the variants
    python -m benchmarks.demo_variants --out /tmp/smoke --quick          # a smoke run (~2 min)

Each variant pre-trains and fine-tunes as `maskdm demo` does (configs/demo_pretrain.yaml, then
configs/demo_finetune.yaml from the pre-trained EMA weights; the variant's ``--set`` overrides on
top, tracking off), samples 256 images (DDIM 100 steps, eta 1, the same seeds for every variant)
and scores them with `maskdm score` against 256 held-out faces: SWD x1e3 on 7x7 patches (mean of
the 32 and 16 px levels) and on whole images. The floor is 256 training faces against the same
held-out faces. One variant takes about as long as the demo (~6 min on 2 CPU cores) plus ~1 min of
sampling; run nothing else meanwhile if its times matter (the scores do not depend on load).

Re-running continues: finished variants are read back, not redone (delete OUT/NAME to redo one;
variants sharing a pre-training reuse it). Prints a table; writes OUT/results.json and
OUT/grid.png (a row of held-out faces, then the first 16 samples of each variant, 3x nearest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# name -> (overrides of both stages, of the fine-tuning only, the variant whose pre-training it
# reuses or None). "min_snr" is the demo as shipped; "uniform" the demo before 0.2.2.
VARIANTS: dict[str, tuple[list[str], list[str], str | None]] = {
    "min_snr": ([], [], None),
    "uniform": (["diffusion.loss_weight=uniform"], [], None),
    "min_snr_seed1": (["train.seed=1"], [], None),
    "uniform_seed1": (["diffusion.loss_weight=uniform", "train.seed=1"], [], None),
    "min_snr_conv": (["model.final_conv=true"], [], None),
    "min_snr_gamma2": (["diffusion.min_snr_gamma=2"], [], None),
    "min_snr_gamma20": (["diffusion.min_snr_gamma=20"], [], None),
    "min_snr_pretrain_only": ([], ["diffusion.loss_weight=uniform"], "min_snr"),
    "min_snr_finetune_only": (["diffusion.loss_weight=uniform"],
                              ["diffusion.loss_weight=min_snr"], "uniform"),
    "uniform_linear": (["diffusion.loss_weight=uniform", "diffusion.schedule=linear"], [], None),
}
QUICK = ["train.steps=20", "train.ckpt_every=10", "train.log_every=10", "train.sample_every=0",
         "eval.steps=10"]


def maskdm(args: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI="")
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-m", "maskdm", *args], stdout=f,
                           stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"error: `maskdm {' '.join(args)}` failed (exit {r.returncode}); its "
                         f"output is in {log}")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def train_stage(config: str, run: Path, overrides: list[str], log: Path) -> float:
    t0 = time.time()
    maskdm(["train", "--config", str(CONFIGS / config), "--resume", "auto",
            *sets(overrides + [f"train.run_dir={run}"])], log)
    return time.time() - t0


def run_variant(name: str, out: Path, n: int, quick: bool) -> dict:
    done = out / name / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    both, ft_only, reuse = VARIANTS[name]
    common = [f"data.shards={out / 'shards'}", "tracking.enabled=false"] + (QUICK if quick else [])
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    res: dict = {"variant": name, "pretrain_sets": both,
                 "finetune_sets": both + ft_only}
    if reuse:
        pre = run_variant(reuse, out, n, quick)["pretrain_run"]
        res["pretrain_s"] = None
    else:
        pre = str(d / "pretrain")
        print(f"  {name}: pre-training", flush=True)
        res["pretrain_s"] = round(train_stage("demo_pretrain.yaml", Path(pre), common + both,
                                              d / "pretrain.log"))
    res["pretrain_run"] = pre
    print(f"  {name}: fine-tuning", flush=True)
    res["finetune_s"] = round(train_stage(
        "demo_finetune.yaml", d / "finetune",
        common + both + ft_only + [f"train.init_from={pre}"], d / "finetune.log"))
    print(f"  {name}: sampling {n} images and scoring", flush=True)
    maskdm(["sample", "--ckpt", str(d / "finetune"), "--num-images", str(n), "--sampler", "ddim",
            "--steps", "10" if quick else "100", "--eta", "1", "--out", str(d / "samples")],
           d / "sample.log")
    score = d / "score.json"
    maskdm(["score", "--samples", str(d / "samples"), "--ref", str(out / "heldout"),
            "--json", str(score)], d / "score.log")
    res.update({k: v for k, v in json.loads(score.read_text()).items()
                if k in ("swd_patch", "swd_image", "n")})
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, done)
    return res


def write_grid(out: Path, names: list[str]) -> Path:
    import numpy as np
    from PIL import Image

    from maskdm.pipeline.eval.score import load_images
    rows = [np.concatenate(list(load_images(out / "heldout", 16)), 1)]
    for name in names:
        files = sorted((out / name / "samples").glob("*.png"))[:16]
        imgs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        imgs += [np.zeros_like(imgs[0])] * (16 - len(imgs))
        rows.append(np.concatenate(imgs, 1))
    g = np.concatenate(rows, 0)
    path = out / "grid.png"
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo_variants",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", default="bench_demo_variants", metavar="DIR",
                    help="output folder (default bench_demo_variants); re-running continues")
    ap.add_argument("--variants", default="uniform,min_snr", metavar="A,B",
                    help="comma-separated names from --list (default uniform,min_snr)")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument("--quick", action="store_true",
                    help="20 steps per stage, 16 samples of 10 DDIM steps: checks the machinery, "
                         "not the settings")
    args = ap.parse_args(argv)
    if args.list:
        for name, (both, ft_only, reuse) in VARIANTS.items():
            what = " ".join(both) or "the demo as shipped"
            if reuse:
                what = f"the pre-training of {reuse}, fine-tuned with {' '.join(ft_only)}"
            print(f"{name:24s} {what}")
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        print(f"error: unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
              f"{', '.join(VARIANTS)} (--list says what each changes)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = 16 if args.quick else 256
    count = 512 if args.quick else 4000
    for folder, extra, k in (("shards", [], count), ("heldout", ["--gen-seed", "1"], n)):
        if not (out / folder / "manifest.json").exists():
            print(f"sharding {k} procedural faces -> {out / folder}", flush=True)
            maskdm(["shard", "procedural", str(out / folder), "--size", "32", "--count", str(k),
                    "--quiet", *extra], out / "shard.log")
    from maskdm.pipeline.eval.score import load_images
    from maskdm.pipeline.eval.swd import swd_scores
    floor = swd_scores(load_images(out / "shards", n), load_images(out / "heldout", n))
    results = []
    for name in names:
        print(f"variant {name}", flush=True)
        results.append(run_variant(name, out, n, args.quick))
    doc = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "samples": n,
           "floor": {"swd_patch": floor["swd_patch"], "swd_image": floor["swd_image"]},
           "variants": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    grid = write_grid(out, names)
    print(f"\nSWD x1e3 against {n} held-out faces (lower is better; the floor is {n} training "
          f"faces: {floor['swd_patch']:.1f} on 7x7 patches, {floor['swd_image']:.1f} on whole "
          f"images)\n")
    print("| variant | pre-training s | fine-tuning s | SWD 7x7 patches | SWD whole images |")
    print("|---|---|---|---|---|")
    for r in results:
        pre = "shared" if r["pretrain_s"] is None else r["pretrain_s"]
        print(f"| {r['variant']} | {pre} | {r['finetune_s']} | {r['swd_patch']:.1f} | "
              f"{r['swd_image']:.1f} |")
    print(f"\n{out / 'results.json'}; first 16 samples of each (held-out faces on top): {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
