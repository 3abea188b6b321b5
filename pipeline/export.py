"""``maskdm export``: a checkpoint's EMA weights -> ``model.safetensors`` + ``config.json``.

The export is self-contained: the config records the architecture, the image size and data space,
the diffusion schedule and where the weights came from, so ``maskdm sample`` (or any user) can
rebuild the model from it alone. ZeRO-3 checkpoints are merged from their per-rank partitions.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from maskdm.shardformat.fsutil import atomic_write_json, fsync_dir

from . import checkpoint as ckpt


def export_weights(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    src = ckpt.resolve(ckpt_path)
    weights, meta = ckpt.load_ema_weights(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The pair is tied by an id in both files: a crash between the two renames below leaves
    # weights and a config of different exports, which load_export refuses (never mixes).
    export_id = secrets.token_hex(8)
    tmp_w = out / f".model.safetensors.{os.getpid()}.tmp"
    tmp_c = out / f".config.json.{os.getpid()}.tmp"
    cfg = meta.config
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_w),
                  metadata={"format": "maskdm-ema", "step": str(meta.step),
                            "export_id": export_id})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_w, 0o666 & ~umask)  # as any other file (safetensors writes 0600)
        atomic_write_json(tmp_c, {
            "format": "maskdm-export", "format_version": 1, "export_id": export_id,
            "weights": "EMA (decay %s)" % cfg["optim"]["ema_decay"],
            "model": meta.model, "image_size": meta.image_size, "space": meta.space,
            "diffusion": cfg["diffusion"], "stage": meta.stage, "step": meta.step,
            "source_checkpoint": str(src.resolve()), "mlflow_run_id": meta.mlflow_run_id,
            "data": {"shards": cfg["data"]["shards"]},
            # the recipe's evaluation protocol: `maskdm sample` uses it unless told otherwise
            "evaluation": {k: cfg["eval"][k] for k in ("sampler", "steps", "eta", "fid_samples",
                                                        "fid_ref") if k in cfg.get("eval", {})},
        })
        os.replace(tmp_w, out / "model.safetensors")
        os.replace(tmp_c, out / "config.json")
        fsync_dir(out)
    finally:  # an error (a full disk) leaves no temporary file behind
        tmp_w.unlink(missing_ok=True)
        tmp_c.unlink(missing_ok=True)
    return out


def load_export(path: str | os.PathLike):
    """-> (weights, model config dict, export config) from an export folder."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").exists() or not (p / "model.safetensors").exists():
        raise ckpt.CheckpointError(f"{p} is not a maskdm export (needs model.safetensors and "
                                   f"config.json; make one with `maskdm export CKPT OUT`)")
    conf = json.loads((p / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(str(p / "model.safetensors"), framework="pt") as f:
        theirs = (f.metadata() or {}).get("export_id")
    if conf.get("export_id") is not None and theirs != conf.get("export_id"):
        raise ckpt.CheckpointError(
            f"{p}: model.safetensors and config.json belong to different exports (export_id "
            f"{theirs} vs {conf.get('export_id')}: an export interrupted between writing the "
            f"two); run `maskdm export` again")
    return load_file(str(p / "model.safetensors")), conf["model"], conf
