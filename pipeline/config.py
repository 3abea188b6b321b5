"""One typed configuration tree for training, loaded from YAML, overridable with ``key=value``.

Unknown keys and wrongly typed values fail with the dotted key named (and a suggestion for typos).
A YAML file may start from another with ``base: other.yaml`` (resolved relative to the file).
Batch sizes derive from ``train.global_batch`` and the world size; the DeepSpeed JSON holds only
the ZeRO stage and precision (``deepspeed_configs/``), everything else is filled in here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from maskdm.deepspeed_configs import DIRECTORY as DEEPSPEED_CONFIGS
from maskdm.model.config import ModelConfig
from maskdm.model.diffusion import LossWeight, Sampler, Schedule
from maskdm.model.masks import MaskSpec, MaskSpecError

from .data.loader import Backend
from .data.transform import Space, model_input_shape

DS_CONFIG_DIR = DEEPSPEED_CONFIGS
Precision = Literal["bf16", "fp16", "fp32"]
DecayOn = Literal["matrices", "all"]
EmaWarmup = Literal["ratio", "power"]
Stage = Literal["pretrain", "finetune"]  # pretrain: MSM (or DSM from scratch with mask.kind none)
Device = Literal["auto", "cuda", "cpu"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to do."""


@dataclass
class DataConfig:
    shards: str = ""  # shard folder made by `maskdm shard`
    image_size: int | None = None  # expected image size (checked against the manifest)
    backend: Backend = "torch"
    workers: int = 2  # torch: DataLoader workers; dali: reader threads
    space: Space = "dwt"  # dwt: Haar subbands (12 x S/2 x S/2); pixel: 3 x S x S
    hflip: bool = True
    strict: bool = False  # damaged samples: replace and count (false) or stop (true)
    # The order (docs/data.md#order): the shards are dealt once to `partitions` partitions and
    # every global batch takes the same number of samples from each (null: the largest power of
    # two <= 16 that divides the batch per micro-step and is at most the number of shards); a
    # node reads only its ranks' partitions. Within a partition the samples of `shuffle_window`
    # shards are shuffled together (null: 8), so batches mix shards even when they were written
    # in sorted order. Both are fixed for a run (kept in its checkpoints).
    partitions: int | None = None
    shuffle_window: int | None = None
    # data.shards may be an s3://, gs:// or http(s):// folder: each node keeps the shards it reads
    # in cache_dir (default $MASKDM_CACHE or ~/.cache/maskdm/shards; shared by the node's ranks),
    # at most cache_limit_gb (0: no limit; it must hold, per partition the node reads, the window
    # and the cache_lookahead shards downloaded ahead of it; null lookahead: the window).
    cache_dir: str | None = None
    cache_limit_gb: float = 0.0
    cache_lookahead: int | None = None
    # An unreachable store (refused, reset, timed out, 5xx, throttled, a listed object missing) is
    # waited out this long (training pauses, the data never changes), then the run stops with
    # exit code 4 and `--resume auto` continues exactly. Every request times out after
    # remote_timeout_s (a stalled connection is an outage, not a hang).
    remote_patience_s: float = 1800.0
    remote_timeout_s: float = 60.0
    # Audit: every rank appends the sample keys of each of its micro-batches to
    # RUN_DIR/data_trace_rankNNNNN.jsonl ({"step", "micro", "keys"}), e.g. to check that a run
    # resumed on another number of ranks saw the same samples at every step.
    trace: bool = False


@dataclass
class DiffusionConfig:
    schedule: Schedule = "cosine"
    num_timesteps: int = 1000
    # uniform: the plain eps-MSE (the paper's, every paper recipe); min_snr: each sample's loss
    # times min(SNR_t, min_snr_gamma) / SNR_t (Hang et al. 2023), which learns faster on small
    # budgets (the demo: docs/demo.md). The logged loss is then the weighted one.
    loss_weight: LossWeight = "uniform"
    min_snr_gamma: float = 5.0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99])
    weight_decay: float = 0.03
    # which parameters decay: "matrices" (biases, norms and embeddings excluded, the usual ViT
    # practice) or "all" (what the paper's authors' code does: AdamW over every parameter)
    weight_decay_on: DecayOn = "matrices"
    eps: float = 1e-8
    warmup_steps: int = 5000
    grad_clip: float = 1.0  # 0: off
    ema_decay: float = 0.999
    ema_every: int = 1  # update the EMA every k optimizer steps
    ema_warmup: EmaWarmup = "ratio"  # ratio: (1+s)/(10+s); power: the authors' ema_pytorch schedule
    ema_power: float = 2 / 3  # power warm-up: decay = 1 - (1 + steps since start) ** -power
    ema_start: int = 100  # power warm-up: the EMA copies the weights for the first steps


@dataclass
class TrainConfig:
    stage: Stage = "pretrain"
    init_from: str | None = None  # finetune: a pretrain checkpoint or run folder
    # MaskDiT: the weight of the reconstruction loss on the masked tokens (0.1 in MaskDiT); needs
    # a model with a decoder (model.decoder_depth > 0, e.g. preset MaskDiT-B) and a mask.
    mae_weight: float = 0.0
    steps: int = 1000
    global_batch: int = 128
    grad_accum: int = 1
    seed: int = 0
    zero_stage: int = 2
    precision: Precision = "bf16"
    deepspeed_config: str | None = None  # explicit JSON instead of zero_stage + precision
    run_dir: str = "runs/maskdm"
    # This node's local working folder (universal-checkpoint conversions when resuming on another
    # number of ranks, the local copy of a run folder in a bucket); made 0700 and refused if
    # another user owns it; default: one per run under $TMPDIR/maskdm-<uid>/scratch.
    scratch_dir: str | None = None
    # Keep the scratch folder after a run in a bucket finishes (default: removed once everything
    # is uploaded; it holds a full copy of the run's last checkpoints).
    keep_scratch: bool = False
    # A run folder in a bucket has one writer: the job holds a lease object in it, renewed every
    # lease_s / 3 s. A job finding another's lease watches it this long: renewed -> refused (the
    # other job is alive); unchanged -> taken over (that job died without releasing it).
    lease_s: float = 90.0
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 0  # steps between sample grids in MLflow (0: only at the end)
    sample_n: int = 16  # images per grid (sampler settings: eval.sampler/steps/eta)
    compile: bool = False
    device: Device = "auto"


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "maskdm"
    run_name: str | None = None
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in the runs folder
    # Nest this run under another MLflow run (maskdm experiment sets it to the experiment's run);
    # default: a fine-tune is nested under the run of its train.init_from checkpoint.
    parent_run_id: str | None = None
    # Points per metric curve: loss, lr, grad_norm, epoch and train_flops are logged every
    # max(1, train.steps // points) steps, without a host sync of their own (they are gathered at
    # the next console line, train.log_every); rates (img/s, data wait) come with console lines.
    points: int = 250
    # MLflow's system metrics (CPU, memory, disk, network, GPU via nvidia-ml-py) every this many
    # seconds, from rank 0's node (0: off).
    system_metrics_every: float = 10.0
    # Also register the exported model under this name in the MLflow model registry (a new
    # version per run); the logged model is always created.
    register_model: str | None = None


@dataclass
class EvalConfig:
    # Sampler settings for the sample grids and training-time FID.
    sampler: Sampler = "ddim"
    steps: int = 50
    eta: float = 0.0
    batch: int = 64  # images per forward pass per rank
    # Training-time FID (EMA weights, sampled on all ranks, logged to MLflow as `fid`).
    fid_every: int = 0  # steps between FID evaluations (0: never); also run at the last step
    fid_samples: int = 1000  # images per evaluation (FID-N)
    fid_ref: str | None = None  # shard folder, stats .npz or image folder; default data.shards
    fid_seed: int = 0  # image i of every evaluation uses the same seed
    inception_weights: str | None = None  # default: $MASKDM_INCEPTION_WEIGHTS, torch hub cache
    # Weight-free metrics during training (no downloads): SWD of EMA samples against score_ref and
    # the held-out denoising loss on `heldout`, logged as swd_patch, swd_image, heldout_loss.
    score_every: int = 0  # steps between evaluations (0: never); also run at the last step
    score_samples: int = 256  # images drawn for the SWD (the reference is cut to match)
    score_ref: str | None = None  # shard folder or image folder; default data.shards
    heldout: str | None = None  # shard folder of held-out images (none: no held-out loss)
    heldout_n: int = 256


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    # The config sections `mask` and `model` are the model package's own types (one definition).
    mask: MaskSpec = field(default_factory=lambda: MaskSpec("block", ratio=0.7, block_size=4))
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, with any credentials inside URLs shown as *** (this is what
        is written to config.yaml, meta.json, export/config.json and MLflow params; the live
        config keeps them for connecting)."""
        from maskdm.shardformat.fsutil import redact_tree
        return redact_tree(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        out = {}
        for section, values in self.to_dict().items():
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        return out

    def model_config(self, image_size: int) -> ModelConfig:
        """The architecture for images of ``image_size`` in ``data.space``."""
        m = self.model
        channels, side, _ = model_input_shape(image_size, self.data.space)
        if m.in_channels is not None and m.in_channels != channels:
            raise ConfigError(f"model.in_channels={m.in_channels} but data.space={self.data.space} "
                              f"gives {channels} channels; remove model.in_channels")
        if m.input_size is not None and m.input_size != side:
            raise ConfigError(f"model.input_size={m.input_size} but {image_size}px images in "
                              f"{self.data.space} space are {side}px; remove model.input_size")
        if m.input_width is not None and m.input_width != side:
            raise ConfigError(f"model.input_width={m.input_width}: training images are square "
                              f"({side}px in {self.data.space} space); remove model.input_width")
        try:
            return dataclasses.replace(m, in_channels=channels, input_size=side).resolved()
        except ValueError as e:
            raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- loading

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{key} must be {names}, got {value!r}")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{key} must be one of {', '.join(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot, no sign) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, values: dict[str, Any], prefix: str, default=None):
    """``default`` (a section's default instance) supplies the values the YAML leaves out."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else \
                f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, dotted, getattr(cls(), key))
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return dataclasses.replace(default, **kwargs) if default is not None else cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base:
        data = _merge(read_yaml(path.parent / base, _seen + (path,)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set key must be section.name (e.g. optim.lr), got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def load_config(paths: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    for p in paths or []:
        data = _merge(data, read_yaml(p))
    for text in overrides or []:
        (section, name), value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section} must be a mapping")
        data[section][name] = value
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that do not need the data (the trainer checks the shards when it starts).
    Choices (``Literal`` fields) were checked while loading."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    if d.workers < 0:
        raise ConfigError("data.workers must be >= 0")
    if d.cache_limit_gb < 0 or (d.cache_lookahead is not None and d.cache_lookahead < 0):
        raise ConfigError("data.cache_limit_gb must be >= 0 (0: no limit) and "
                          "data.cache_lookahead >= 0 (or null: the shuffle window)")
    if d.partitions is not None and d.partitions < 1:
        raise ConfigError(f"data.partitions must be >= 1 (or null: automatic), got {d.partitions}")
    if d.shuffle_window is not None and d.shuffle_window < 1:
        raise ConfigError(f"data.shuffle_window must be >= 1 shard (or null: 8), got "
                          f"{d.shuffle_window}")
    if d.partitions is not None and (t.global_batch // max(t.grad_accum, 1)) % d.partitions:
        raise ConfigError(f"data.partitions={d.partitions} must divide the global batch per "
                          f"micro-step (train.global_batch / train.grad_accum = "
                          f"{t.global_batch // max(t.grad_accum, 1)}): every batch takes the same "
                          f"number of samples from each partition")
    if d.remote_patience_s < 0 or d.remote_timeout_s <= 0:
        raise ConfigError("data.remote_patience_s must be >= 0 and data.remote_timeout_s > 0 "
                          "(seconds)")
    if d.image_size is not None and (d.image_size < 2 or d.image_size % 2):
        raise ConfigError(f"data.image_size must be a positive even number, got {d.image_size}")
    try:
        cfg.mask.validate()
        cfg.model.architecture()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.stage == "finetune":
        if cfg.mask.is_masked:
            raise ConfigError("train.stage=finetune trains with plain denoising score matching: "
                              "set mask.kind=none (or mask.ratio=0)")
        if not t.init_from:
            raise ConfigError("train.stage=finetune needs train.init_from: a pretrain checkpoint "
                              "or run folder")
    if t.mae_weight < 0:
        raise ConfigError(f"train.mae_weight must be >= 0, got {t.mae_weight}")
    if t.mae_weight > 0:
        if not cfg.model.architecture().decoder_depth:
            raise ConfigError("train.mae_weight > 0 (MaskDiT's reconstruction loss) needs a "
                              "decoder that predicts the masked tokens: set model.decoder_depth "
                              "(e.g. 2) or model.preset: MaskDiT-B")
        if not cfg.mask.is_masked:
            raise ConfigError("train.mae_weight > 0 reconstructs the masked tokens, but "
                              f"mask.kind={cfg.mask.kind} masks none: set a mask (MaskDiT: "
                              "kind patch, ratio 0.5) or train.mae_weight=0 (the unmasking "
                              "fine-tune)")
    for name in ("steps", "global_batch", "grad_accum", "ckpt_every", "log_every", "sample_n",
                 "keep_last"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.seed < 0:
        raise ConfigError(f"train.seed must be >= 0, got {t.seed}")
    if cfg.tracking.points < 1:
        raise ConfigError(f"tracking.points must be >= 1 (points per metric curve), got "
                          f"{cfg.tracking.points}")
    if cfg.train.lease_s <= 0:
        raise ConfigError(f"train.lease_s must be > 0 seconds, got {cfg.train.lease_s}")
    if cfg.tracking.system_metrics_every < 0:
        raise ConfigError(f"tracking.system_metrics_every must be >= 0 seconds (0: off), got "
                          f"{cfg.tracking.system_metrics_every}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.lr <= 0 or o.weight_decay < 0 or o.warmup_steps < 0 or o.grad_clip < 0:
        raise ConfigError("optim.lr must be > 0; weight_decay, warmup_steps, grad_clip >= 0")
    if not 0 <= o.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    if o.ema_every < 1 or o.ema_power <= 0 or o.ema_start < 0:
        raise ConfigError("optim.ema_every must be >= 1, optim.ema_power > 0 and "
                          "optim.ema_start >= 0")
    if not cfg.diffusion.min_snr_gamma > 0:
        raise ConfigError(f"diffusion.min_snr_gamma must be > 0 (5 in Hang et al.), got "
                          f"{cfg.diffusion.min_snr_gamma}")
    if not 1 <= cfg.eval.steps <= cfg.diffusion.num_timesteps:
        raise ConfigError(f"eval.steps must be in 1..{cfg.diffusion.num_timesteps}")
    if cfg.eval.fid_every < 0 or cfg.eval.fid_samples < 2 or cfg.eval.batch < 1:
        raise ConfigError("eval.fid_every must be >= 0, eval.fid_samples >= 2, eval.batch >= 1")
    if d.image_size is not None:
        check_shapes(cfg, d.image_size)


MAX_TOKENS = 65536  # tokens per image: attention memory grows with its square


def check_shapes(cfg: Config, image_size: int) -> ModelConfig:
    """Model and mask against the real image size (called again once the manifest is read)."""
    mcfg = cfg.model_config(image_size)
    tokens = mcfg.grid[0] * mcfg.grid[1] * mcfg.token_groups
    if tokens > MAX_TOKENS:
        raise ConfigError(f"{image_size}px {cfg.data.space} input with patch {mcfg.patch_size} "
                          f"gives {tokens:,} tokens per image, more than the {MAX_TOKENS:,} this "
                          f"transformer is built for (512px DWT input with patch 1 is 65,536): "
                          f"check data.image_size, or raise model.patch_size")
    try:
        cfg.mask.validate(mcfg.grid)
    except MaskSpecError as e:
        raise ConfigError(f"{e} (token grid of {image_size}px {cfg.data.space} input with patch "
                          f"{mcfg.patch_size})") from None
    return mcfg


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The full DeepSpeed config: ZeRO + precision from the JSON, batch sizes and clipping here."""
    t = cfg.train
    path = Path(t.deepspeed_config) if t.deepspeed_config else \
        DS_CONFIG_DIR / f"zero{t.zero_stage}_{t.precision}.json"
    if not path.exists():
        raise ConfigError(f"DeepSpeed config {path} does not exist (train.deepspeed_config, or "
                          f"train.zero_stage/precision)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    extra = set(ds) - {"zero_optimization", "bf16", "fp16", "comment"}
    if extra:
        raise ConfigError(f"{path}: holds {sorted(extra)}; DeepSpeed configs here hold only "
                          f"zero_optimization and precision (batch sizes come from train.*)")
    ds.pop("comment", None)
    micro = micro_batch(t, world_size)
    ds.update({
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    return ds


def micro_batch(t: TrainConfig, world_size: int) -> int:
    """Samples per rank per forward pass: global_batch / (world size x grad_accum), exactly."""
    micro = t.global_batch // (world_size * t.grad_accum)
    if micro < 1 or micro * world_size * t.grad_accum != t.global_batch:
        raise ConfigError(f"train.global_batch ({t.global_batch}) must be divisible by world size "
                          f"({world_size}) x train.grad_accum ({t.grad_accum})")
    return micro


def precision_of(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
