"""What resuming on another number of GPUs costs: the time DeepSpeed's universal-checkpoint
conversion takes for the paper's model sizes, on this machine's CPU.

    python -m benchmarks.universal_checkpoint                     # MaskDM-B and MaskDM-L
    python -m benchmarks.universal_checkpoint --presets MaskDM-B --ranks 2

For each preset it writes a real ZeRO-1 checkpoint (2 CPU ranks, one training step of the model
on small 32 px inputs: the parameter count, and so the checkpoint, is the model's at any image
size but for its positional embedding), then times ``checkpoint.universal_copy`` (the conversion
``--resume auto`` runs when the world size changed) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(shards: Path, run: Path, preset: str, ranks: int) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(29700 + os.getpid() % 200), "-m", "maskdm", "train",
           "--config", str(ROOT / "configs" / "test_tiny.yaml"),
           "--set", f"data.shards={shards}", "--set", f"train.run_dir={run}",
           "--set", f"model.preset={preset}", "--set", "model.patch_size=4",
           "--set", "model.dwt_tokens=split", "--set", "train.steps=1", "--set",
           "train.ckpt_every=1", "--set", f"train.global_batch={ranks}", "--set",
           "train.zero_stage=1", "--set", "train.sample_n=1", "--set", "eval.steps=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training {preset} failed:\n{(r.stdout + r.stderr)[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["MaskDM-B", "MaskDM-L"])
    ap.add_argument("--ranks", type=int, default=2, help="ranks that write the checkpoint")
    args = ap.parse_args(argv)
    from maskdm.pipeline import checkpoint as ckpt
    from maskdm.preprocessing.shard_job import ShardOptions, run
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskdm-ucp-") as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        run(ShardOptions(src="procedural", out=str(shards), source="procedural", size=32,
                         count=64, samples_per_shard=64, workers=1), progress=False,
            log=lambda *a: None)
        for preset in args.presets:
            t0 = time.time()
            _train(shards, tmp / preset, preset, args.ranks)
            write = time.time() - t0
            path = ckpt.complete_checkpoints(tmp / preset / "checkpoints")[-1]
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            t0 = time.time()
            universal = ckpt.universal_copy(path, tmp / "scratch")
            conv = time.time() - t0
            usize = sum(f.stat().st_size for f in (universal / path.name).rglob("*")
                        if f.is_file())
            import torch
            weights = torch.load(path / "ema_rank00000.pt", weights_only=True)["shadow"]
            n = sum(t.numel() for t in weights.values())
            rows.append((preset, n, size, usize, conv, write))
            print(f"{preset}: {n / 1e6:.0f}M parameters, checkpoint {size / 2 ** 30:.2f} GiB, "
                  f"conversion {conv:.0f} s", flush=True)
    cpu = platform.processor() or platform.machine()
    print(f"\nuniversal-checkpoint conversion (ZeRO-1, fp32, {args.ranks} ranks -> any), "
          f"{datetime.date.today()}, {os.cpu_count()} CPU cores ({cpu}), torch "
          f"{__import__('torch').__version__}, deepspeed {__import__('deepspeed').__version__}")
    print("| preset | parameters | checkpoint | universal copy | conversion |")
    print("|---|---|---|---|---|")
    for preset, n, size, usize, conv, _ in rows:
        print(f"| {preset} | {n / 1e6:.0f}M | {size / 2 ** 30:.2f} GiB | {usize / 2 ** 30:.2f} GiB "
              f"| {conv:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
