"""Mutation check of the science (``model/``, the SWD, the speed-up rule): does a test fail when
the code is wrong?

    python -m tests.mutants            # every mutant, against the model tests
    python -m tests.mutants --list     # what each mutant changes

Each mutant is one textual edit of a file (a plausible mistake: a wrong target, a wrong index, a
missing term, a wrong constant). The script applies it, runs the fast tests of that file (the model
and diffusion tests for ``model/``; stopping at the first failure), restores the file, and prints a table: a mutant is *killed* when a
test fails and *survives* when they all pass. Surviving mutants are gaps in the tests (or edits
that do not change behaviour); they are listed with the reason in the issue notes.
Not a pytest module (its name does not start with ``test_``): it runs the suite many times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_masks_dwt_diffusion.py", "tests/test_model.py"]
# the tests that pin each mutated file's science (fast tier: -m "not slow")
TESTS_OF = {"pipeline/eval/swd.py": ["tests/test_score.py"],
            "pipeline/experiment/compare.py": ["tests/test_experiment.py"]}

# (file, original text, mutated text, what the mistake is)
MUTANTS: list[tuple[str, str, str, str]] = [
    ("model/objective.py", "target = gather_tokens(patchify(noise, self.patch_size), keep_idx)",
     "target = gather_tokens(patchify(x0, self.patch_size), keep_idx)",
     "MSM target is x0 instead of the noise"),
    ("model/objective.py", "target = gather_tokens(patchify(noise, self.patch_size), keep_idx)",
     "target = gather_tokens(patchify(noise, self.patch_size), keep_idx.flip(-1))",
     "MSM target gathered at the wrong token positions (keep_idx reversed)"),
    ("model/objective.py", "            target = noise\n", "            target = x0\n",
     "DSM target is x0 instead of the noise"),
    ("model/diffusion.py",
     "mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + \\\n"
     "                    (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x",
     "mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0",
     "DDPM posterior mean without its x_t term"),
    ("model/diffusion.py", "def cosine_betas(T: int, s: float = 0.008,",
     "def cosine_betas(T: int, s: float = 0.0,", "cosine schedule offset s = 0"),
    ("model/diffusion.py", "return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)",
     "return np.linspace(scale * 1e-4, scale * 0.01, T, dtype=np.float64)",
     "linear schedule ends at beta 0.01 instead of 0.02"),
    ("model/diffusion.py", "        return a * x0 + b * noise", "        return b * x0 + a * noise",
     "q_sample with the two coefficients swapped"),
    ("model/diffusion.py",
     "sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))",
     "sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab))", "DDIM sigma without (1 - a_t/a_prev)"),
    ("model/diffusion.py", "var = beta * (1 - ab_prev) / (1 - ab)", "var = beta",
     "DDPM uses beta instead of the posterior variance"),
    ("model/diffusion.py", "x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)",
     "x0 = (x - math.sqrt(1 - ab) * eps) / ab", "x0 estimate divides by alpha_bar, not its root"),
    ("model/uvit.py", "            pos = gather_tokens(pos, keep_idx)\n", "",
     "visible tokens get the positions of tokens 0..S-1"),
    ("model/uvit.py", "            x = self._run(half + 1 + i, blk, x, skips.pop())",
     "            x = self._run(half + 1 + i, blk, x, skips[i])",
     "long skips connected in the wrong order"),
    ("model/uvit.py", "    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "    emb = torch.cat([torch.cos(args), torch.cos(args)], dim=-1)",
     "timestep embedding loses its sine half"),
    ("model/objective.py",
     "return err.sum() / valid.sum() if valid is not None else err.mean()",
     "return err.mean()",
     "split tokens: the loss averages the zero padding too"),
    ("model/diffusion.py", "return snr.clamp(max=gamma) / snr", "return snr.clamp(min=gamma) / snr",
     "min-SNR: the weight caps the wrong end (boosts the noisy steps instead)"),
    ("model/objective.py", "            err = err * w.view(-1, *([1] * (err.ndim - 1)))\n", "",
     "min-SNR: the weights are computed but never applied"),
    ("model/uvit.py", "torch.where((keep_idx < n).unsqueeze(-1), ll, self.detail_head(x))",
     "torch.where((keep_idx >= n).unsqueeze(-1), ll, self.detail_head(x))",
     "split tokens: LL and detail heads swapped in the masked output"),
    ("model/masks.py", "sample_keep_idx(spec, batch, grid, gen) + k * n for k in range(groups)",
     "sample_keep_idx(spec, batch, grid, gen) for k in range(groups)",
     "split tokens: every group's mask indexes the first group"),
    ("model/masks.py", "            return n - round(self.ratio * n)",
     "            return n - round(self.ratio * n) + 1", "patch mask keeps one token too many"),
    ("model/dwt.py", "torch.add(t, c, out=dv).sub_(d)\n    torch.sub(t, c, out=dd).add_(d)",
     "torch.add(t, c, out=dd).sub_(d)\n    torch.sub(t, c, out=dv).add_(d)",
     "Haar V and D bands swapped"),
    ("model/dwt.py", "torch.mul((t + dv).sub_(dd), 0.5, out=out[..., 1::2, 0::2])",
     "torch.mul((t + dv).sub_(dd), 0.5, out=out[..., 0::2, 1::2])",
     "inverse Haar: a pixel of each 2x2 block written to the wrong place"),
    ("model/uvit.py", "tokens = full.scatter(1, keep_idx.unsqueeze(-1)",
     "tokens = full.scatter(1, keep_idx.flip(-1).unsqueeze(-1)",
     "MaskDiT decoder: visible tokens scattered to the wrong positions"),
    ("model/uvit.py", "            y = blk(y)\n", "            y = blk(y) * 0 + y\n",
     "MaskDiT decoder: its blocks are skipped"),
    ("model/objective.py", "return (per_token * masked).sum() / masked.sum().clamp_min(1)",
     "return per_token.mean()", "MAE loss averages the visible tokens too"),
    ("model/objective.py", "(target.var(-1, keepdim=True) + 1e-6) ** .5", "1.0",
     "MAE target not normalised per patch"),
    ("model/objective.py", "return dsm + self.mae_weight * mae_loss(", "return dsm + mae_loss(",
     "MAE loss weight ignored"),
    ("model/uvit.py", "extra.append(self.flip_embed(f).unsqueeze(1))",
     "extra.append(self.flip_embed(torch.zeros_like(f)).unsqueeze(1))",
     "flip conditioning: the flag never reaches the model"),
    ("model/flops.py", "+ 2 * N * Dd * per_token)  # head on every token",
     "+ 2 * S * Dd * per_token)  # head on every token",
     "FLOPs: the decoder's head counted on the visible tokens only"),
    ("model/flops.py", "        embed = 2 * cfg.num_tokens * per_token * D\n", "",
     "FLOPs: split tokens embedded only where visible (the model embeds both groups whole)"),
    ("model/flops.py", "        head = 2 * S * D * cfg.patch_dim\n", "",
     "FLOPs: split tokens' two heads counted as one on the visible tokens"),
    ("model/uvit.py", ".reshape(groups, h, w, dim).permute(0, 3, 1, 2)",
     ".reshape(groups, w, h, dim).permute(0, 3, 2, 1)",
     "pos-embed resize: the grid read transposed"),
    ("model/uvit.py", "size=(nh, nw), mode=\"bicubic\"", "size=(nw, nh), mode=\"bicubic\"",
     "pos-embed resize: target height and width swapped"),
    ("model/uvit.py", "mode=\"bicubic\", align_corners=False",
     "mode=\"bilinear\", align_corners=False", "pos-embed resize: bilinear instead of bicubic"),
    ("model/uvit.py", "mode=\"bicubic\", align_corners=False",
     "mode=\"bicubic\", align_corners=True", "pos-embed resize: corners aligned"),
    ("pipeline/eval/swd.py", "sliced_wasserstein(normalise(da, db), normalise(db, db),",
     "sliced_wasserstein(normalise(da, da), normalise(db, db),",
     "SWD: each set normalised by its own statistics (blind to colour shifts)"),
    ("pipeline/eval/swd.py", "    xx = (xs[..., None, None] + off[None, :])",
     "    xx = (xs[..., None, None] + off[:, None])", "SWD: 7x7 windows transposed"),
    ("pipeline/eval/swd.py", "NHOOD = 7", "NHOOD = 5", "SWD: 5x5 neighbourhoods"),
    ("pipeline/eval/swd.py", "reference.std(dim=(0, 1)).clamp_min(1e-8)",
     "reference.std().clamp_min(1e-8)", "SWD: one std over all channels"),
    ("pipeline/experiment/compare.py", "    i = above[-1]\n", "    i = above[0]\n",
     "speed-up: first reach instead of reach-and-stay"),
    ("pipeline/experiment/compare.py", "r, end = reach_and_stay(reference, target), arm.flops[-1]",
     "r, end = reach_and_stay(reference, target), reach_and_stay(arm, target).flops",
     "speed-up: an arm that ends worse is charged only until it gets to its final value"),
    ("pipeline/experiment/compare.py", "lo, hi = _ratio(r.lo, a.hi), _ratio(r.hi, a.lo)",
     "lo, hi = _ratio(r.lo, a.lo), _ratio(r.hi, a.hi)",
     "speed-up: the bracket pairs the wrong ends"),
]


def run_mutant(path: str, old: str, new: str) -> tuple[str, float]:
    f = ROOT / path
    text = f.read_text()
    if old not in text:
        return "not applicable (text not found)", 0.0
    f.write_text(text.replace(old, new, 1))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            "-m", "not slow", *TESTS_OF.get(path, TESTS)], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    finally:
        f.write_text(text)
    return ("killed" if r.returncode != 0 else "SURVIVED"), time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", type=int, nargs="+", default=None, metavar="I",
                    help="run only these mutants (numbers from --list)")
    args = ap.parse_args(argv)
    if args.list:
        for i, (path, _, _, what) in enumerate(MUTANTS):
            print(f"{i:2d}  {path:22s} {what}")
        return 0
    rows = []
    for i, (path, old, new, what) in enumerate(MUTANTS):
        if args.only is not None and i not in args.only:
            continue
        verdict, dt = run_mutant(path, old, new)
        rows.append((i, path, what, verdict, dt))
        print(f"{i:2d}  {verdict:9s} {dt:5.0f}s  {path}: {what}", flush=True)
    survived = [r for r in rows if r[3] == "SURVIVED"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutants killed"
          + (f"; surviving: {', '.join(str(r[0]) for r in survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
