"""``maskdm doctor``: can this machine (or this node of a cluster) run the job? One line per check.

Every check says OK, WARN or FAIL, and every non-OK line its fix (the pip command, the variable,
the flag). Without ``--config`` the machine is checked for training in general (a missing
optional package is a WARN); with a config, what that config needs is checked and a missing piece
of it is a FAIL (no xformers is a FAIL only with ``model.attention: xformers``, no DALI only with
``data.backend: dali``), plus its shards, tracking server and disks. Exit code 1 on any FAIL.
``--run`` then runs a short real job (``doctor_run.py``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from maskdm.shardformat.fsutil import redact_url

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_dist() -> str | None:
    for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        if _version(d):
            return d
    return None


def node_identity() -> str:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    node = os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID"))
    parts = [socket.gethostname()]
    if node is not None:
        parts.append(f"node {node}")
    if rank is not None:
        parts.append(f"rank {rank}")
    return ", ".join(parts)


def check_machine(cfg=None) -> list[Check]:
    import torch
    out = []
    py = platform.python_version()
    out.append(Check("python", OK if sys.version_info >= (3, 10) else FAIL, py,
                     "" if sys.version_info >= (3, 10) else "use Python 3.10 or newer"))
    cuda = torch.version.cuda
    build = f"CUDA {cuda}" if cuda else "CPU build"
    if cuda and torch.backends.cudnn.is_available():
        build += f", cuDNN {torch.backends.cudnn.version()}"
    out.append(Check("torch", OK, f"{torch.__version__} ({build})"))
    wants_gpu = cfg is not None and cfg.train.device == "cuda"
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        desc = "; ".join(f"{g.name} {g.total_memory / 2 ** 30:.0f} GiB" for g in gpus)
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Check("gpus", OK, f"{len(gpus)}: {desc}; bf16 {'yes' if bf16 else 'no'}"))
        needs_bf16 = cfg is not None and cfg.train.precision == "bf16"
        if needs_bf16 and not bf16:
            out.append(Check("bf16", FAIL, "train.precision=bf16 but this GPU has no bf16",
                             "--set train.precision=fp16 (or fp32)"))
    else:
        why = "built without CUDA" if cuda is None else "no GPU visible (CUDA_VISIBLE_DEVICES?)"
        out.append(Check("gpus", FAIL if wants_gpu else WARN, f"none ({why}): training runs on "
                         f"the CPU (slow; fine for the demo and tests)",
                         "install the torch build for your CUDA (pytorch.org lists the index "
                         "for each), e.g. pip install torch --index-url "
                         "https://download.pytorch.org/whl/cu128" if cuda is None else
                         "check nvidia-smi and CUDA_VISIBLE_DEVICES"))
    dist = torch.distributed
    backends = [b for b, ok in (("nccl", dist.is_nccl_available()),
                                ("gloo", dist.is_gloo_available())) if ok]
    need_nccl = torch.cuda.is_available()
    ok = ("nccl" in backends or not need_nccl) and "gloo" in backends
    out.append(Check("distributed", OK if ok else FAIL, ", ".join(backends) or "none",
                     "" if "gloo" in backends else "a torch build with torch.distributed"))
    out += _check_deepspeed()
    out += _check_triton_compiler(cfg)
    out += _check_dali(cfg)
    out += _check_xformers(cfg)
    out.append(_check_cores(cfg))
    return out


def _check_deepspeed() -> list[Check]:
    import contextlib
    import io
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its logger writes to stdout (--json)
            import deepspeed
    except Exception as e:  # an import that fails for any reason is the finding
        return [Check("deepspeed", FAIL, f"not importable ({type(e).__name__}: {e})",
                      "pip install 'deepspeed>=0.14,<0.20'")]
    import torch
    detail = f"{deepspeed.__version__}; ops this project needs: none on GPUs (the optimizer is " \
             f"torch's AdamW)"
    status, fix = OK, ""
    if not torch.cuda.is_available():  # the CPU accelerator compiles its shared-memory comm op
        compiler = shutil.which("c++") or shutil.which("g++")
        ninja = _version("ninja") or shutil.which("ninja")
        detail = f"{deepspeed.__version__}; on CPU it compiles its shm comm op once (needs a C++ " \
                 f"compiler: {'found' if compiler else 'missing'}, ninja: " \
                 f"{'found' if ninja else 'missing'})"
        if not (compiler and ninja):
            status, fix = WARN, "install g++ and `pip install ninja` (or run on GPUs)"
    return [Check("deepspeed", status, detail, fix)]


def _check_triton_compiler(cfg) -> list[Check]:
    """On GPUs, torch.compile's Triton builds its kernel launchers with the system's C compiler:
    without one, `train.compile: true` fails at the first step."""
    import torch
    if not torch.cuda.is_available():
        return []  # (the CPU path's compiler need is in the deepspeed check)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or \
        shutil.which("clang")
    if cc:
        return [Check("C compiler (Triton)", OK, f"{cc} (torch.compile builds its kernels)")]
    needed = cfg is not None and cfg.train.compile
    return [Check("C compiler (Triton)", FAIL if needed else WARN,
                  "missing: torch.compile on GPUs needs one to build Triton's launchers"
                  + (" (train.compile=true)" if needed else ""),
                  "install gcc (apt-get install gcc), set CC, or train.compile=false")]


def _check_dali(cfg) -> list[Check]:
    import torch
    needed = cfg is not None and cfg.data.backend == "dali"
    dist = _dali_dist()
    cuda = torch.version.cuda
    want = f"nvidia-dali-cuda{cuda.split('.')[0]}0" if cuda else "nvidia-dali-cuda130"
    extra = "dali" if cuda and cuda.startswith("12") else "dali-cuda13"
    if dist is None:
        return [Check("dali", FAIL if needed else WARN, "not installed" + (
            " (data.backend=dali needs it)" if needed else "; the torch loader works without"),
            f"pip install 'maskdm[{extra}]' (installs {want})")]
    try:
        import nvidia.dali as dali
    except Exception as e:
        return [Check("dali", FAIL if needed else WARN, f"{dist} installed but not importable "
                      f"({type(e).__name__}: {e})", f"pip install --force-reinstall {want}")]
    if cuda and dist != want:
        return [Check("dali", FAIL if needed else WARN, f"{dist} {dali.__version__} does not match "
                      f"torch's CUDA {cuda}", f"pip uninstall -y {dist} && pip install {want}")]
    where = "GPU decode" if torch.cuda.is_available() else "CPU operators only (no GPU)"
    return [Check("dali", OK, f"{dist} {dali.__version__}: {where}")]


def _check_xformers(cfg) -> list[Check]:
    import torch
    needed = cfg is not None and cfg.model.attention == "xformers"
    if _version("xformers") is None:
        return [Check("xformers", FAIL if needed else (WARN if torch.cuda.is_available() else OK),
                      "not installed" + ("" if torch.cuda.is_available() or needed else
                                         " (CPU: SDPA is used)"),
                      "pip install 'maskdm[xformers]' (a build for this torch: "
                      f"{torch.__version__}), or --set model.attention=sdpa")]
    if not torch.cuda.is_available():
        return [Check("xformers", FAIL if needed else OK, f"{_version('xformers')} installed; its "
                      f"kernels need a GPU", "--set model.attention=sdpa" if needed else "")]
    try:
        import xformers.ops as xops
        q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        return [Check("xformers", OK, f"{_version('xformers')}: memory-efficient attention runs")]
    except Exception as e:
        return [Check("xformers", FAIL if needed else WARN, f"{_version('xformers')} does not run "
                      f"here ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                      f"pip install xformers built for torch {torch.__version__}, or --set "
                      f"model.attention=sdpa")]


def _check_cores(cfg) -> Check:
    import torch
    cores = len(os.sched_getaffinity(0))
    ranks = max(1, torch.cuda.device_count())
    per = cores / ranks
    want = max(4, (cfg.data.workers if cfg is not None else 2) + 1)
    unit = "per GPU" if torch.cuda.is_available() else "for one CPU rank"
    if per >= want:
        return Check("cpu cores", OK, f"{cores} ({per:.0f} {unit})")
    return Check("cpu cores", WARN, f"{cores} ({per:.0f} {unit}; the loader wants ~{want} per "
                 f"rank)", "lower data.workers, or use data.backend=dali (decodes on the GPU)")


def check_config(cfg) -> list[Check]:
    """What a training config needs beyond the machine: its shards, tracking, disks."""
    out = [_check_shards(cfg), _check_tracking(cfg)]
    out += _check_disks(cfg)
    return out


def _check_shards(cfg) -> Check:
    from maskdm.shardformat.manifest import DatasetError
    from maskdm.shardformat.reader import SampleError, ShardReader
    from maskdm.shardformat.remote import CacheOptions, RemoteError
    d = cfg.data
    if not d.shards:
        return Check("shards", FAIL, "data.shards is not set", "--set data.shards=FOLDER (make "
                     "one with `maskdm shard SRC OUT`)")
    try:
        reader = ShardReader(d.shards, cache=CacheOptions(d.cache_dir, d.cache_limit_gb,
                                                          min(d.remote_patience_s, 60.0),
                                                          d.remote_timeout_s))
        entry = reader.shard_entry(0)
        path = reader.tar_path(0)  # a bucket: downloaded and its sha256 checked on the way
        if reader.remote is None:
            from maskdm.shardformat.fsutil import sha256_file
            if sha256_file(path) != entry.sha256:
                return Check("shards", FAIL, f"{entry.name}: sha256 differs from the manifest",
                             f"maskdm shard --verify {d.shards}")
        reader.read_at(0, 0)
    except (DatasetError, SampleError, RemoteError, OSError, ValueError) as e:
        return Check("shards", FAIL, f"{d.shards}: {str(e).splitlines()[0][:300]}",
                     f"maskdm shard --verify {d.shards}, or point data.shards at a shard folder")
    left = f"; {len(reader.excluded)} damaged shard(s) left out" if reader.excluded else ""
    return Check("shards", WARN if reader.excluded else OK,
                 f"{reader.location}: {reader.num_samples} samples, {reader.image_size}px "
                 f"{reader.encoding}; {entry.name} read and checked{left}",
                 f"maskdm shard --verify {d.shards}" if reader.excluded else "")


def _check_tracking(cfg) -> Check:
    if not cfg.tracking.enabled:
        return Check("mlflow", OK, "tracking.enabled=false: no MLflow")
    from .tracking import default_uri
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and "://" not in str(cfg.train.run_dir):
        uri = default_uri(cfg.train.run_dir)[0]
    if not uri:
        return Check("mlflow", WARN, "train.run_dir is in a bucket and no tracking server is set: "
                     "the MLflow store would be a file on node 0's scratch disk",
                     "export MLFLOW_TRACKING_URI=http://HOST:5000")
    shown = redact_url(uri)  # what the report says: never a credential inside the URI
    if uri.startswith(("http://", "https://")):
        import base64
        import urllib.parse
        import urllib.request
        parts = urllib.parse.urlsplit(uri)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        plain = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
        request = urllib.request.Request(urllib.parse.urlunsplit(plain).rstrip("/") + "/health")
        if parts.username is not None:  # user:password@ in the URI: HTTP basic auth, as MLflow
            token = f"{urllib.parse.unquote(parts.username)}:" \
                    f"{urllib.parse.unquote(parts.password or '')}"
            request.add_header("Authorization",
                               "Basic " + base64.b64encode(token.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                r.read()
        except Exception as e:
            return Check("mlflow", FAIL, f"{shown} does not answer ({type(e).__name__}: "
                         f"{redact_url(str(e))[:160]})", "start the server (`mlflow server --host "
                         "ADDRESS`: 127.0.0.1 serves this machine only, an address of the "
                         "cluster network serves every node, and MLflow's server has no "
                         "authentication unless you add it), fix MLFLOW_TRACKING_URI / "
                         "tracking.uri, or --set tracking.enabled=false; training itself would "
                         "go on and sync later")
        return _check_artifacts(uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        ok = os.access(_existing(folder), os.W_OK)
        return Check("mlflow", OK if ok else FAIL, f"{shown} (a local file store)",
                     "" if ok else f"make {folder} writable, or set MLFLOW_TRACKING_URI")
    return Check("mlflow", OK, f"{shown}")


def _check_artifacts(uri: str) -> Check:
    """The server answers: can this node log an artifact through it (a throwaway run in the
    experiment `maskdm-doctor`, deleted again)?"""
    import tempfile

    import mlflow
    try:
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("maskdm-doctor")
        exp_id = exp.experiment_id if exp else client.create_experiment("maskdm-doctor")
        run = client.create_run(exp_id, run_name=f"doctor {socket.gethostname()}")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "probe.txt").write_text("maskdm doctor\n")
            client.log_artifact(run.info.run_id, str(Path(tmp) / "probe.txt"))
        client.delete_run(run.info.run_id)
    except Exception as e:
        return Check("mlflow", FAIL, f"{redact_url(uri)} answers but logging an artifact failed "
                     f"({type(e).__name__}: {redact_url(str(e).splitlines()[0])[:160]})",
                     "check the server's --artifacts-destination and this node's access to it")
    return Check("mlflow", OK, f"{redact_url(uri)} answers; an artifact was logged and deleted")


def _existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_disks(cfg) -> list[Check]:
    """Room for ``keep_last`` + 1 checkpoints (estimated from the model's parameters: weights,
    Adam's two moments, the EMA) where checkpoints are written, and for the shard cache."""
    from .config import check_shapes
    from .train import default_scratch
    out = []
    try:
        from maskdm.model import build_model
        from maskdm.shardformat.manifest import load_manifest
        size = cfg.data.image_size or load_manifest(cfg.data.shards).image_size
        import torch
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(check_shapes(cfg, size)).parameters())
        per_ckpt = params * 4 * 4  # fp32 weights, exp_avg, exp_avg_sq, EMA
    except Exception:
        per_ckpt = None
    remote = "://" in str(cfg.train.run_dir)
    where = Path(cfg.train.scratch_dir) if cfg.train.scratch_dir else (
        default_scratch(cfg.train.run_dir) if remote else Path(cfg.train.run_dir))
    free = shutil.disk_usage(_existing(where.resolve())).free
    if per_ckpt:
        need = per_ckpt * (cfg.train.keep_last + 1)
        ok = free >= need
        out.append(Check("checkpoint disk", OK if ok else WARN,
                         f"{_existing(where.resolve())}: {free / 2 ** 30:.1f} GiB free; a "
                         f"checkpoint ~{per_ckpt / 2 ** 30:.2f} GiB, {cfg.train.keep_last} + 1 "
                         f"kept at once", "" if ok else "free space, lower train.keep_last or "
                         "point train.run_dir (or train.scratch_dir) at a larger disk"))
    if "://" in str(cfg.data.shards):
        from maskdm.shardformat.remote import default_cache_dir
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        free = shutil.disk_usage(_existing(cache.resolve())).free
        limit = cfg.data.cache_limit_gb * 2 ** 30
        ok = not limit or free >= limit
        out.append(Check("cache disk", OK if ok else WARN, f"{_existing(cache)}: "
                         f"{free / 2 ** 30:.1f} GiB free (data.cache_limit_gb="
                         f"{cfg.data.cache_limit_gb or 'unlimited'})",
                         "" if ok else "lower data.cache_limit_gb or set data.cache_dir to a "
                         "larger disk"))
    return out


def report(checks: list[Check], *, as_json: bool, file=None) -> int:
    file = file or sys.stdout
    # shard and tracking URLs appear in the details: never with their credentials
    checks = [Check(c.name, c.status, redact_url(c.detail), redact_url(c.fix)) for c in checks]
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        print(json.dumps({"node": node_identity(), "ok": not failed,
                          "checks": [asdict(c) for c in checks]}, indent=1), file=file)
        return 1 if failed else 0
    print(f"maskdm doctor on {node_identity()}", file=file)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {c.status:4s}  {c.name:{width}s}  {c.detail}", file=file)
        if c.fix and c.status != OK:
            print(f"  {'':4s}  {'':{width}s}  fix: {c.fix}", file=file)
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    print(f"{'FAIL' if fails else 'OK'}: {fails} failed, {warns} warning(s)", file=file)
    return 1 if failed else 0
