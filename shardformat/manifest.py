"""``manifest.json``: the contract between a shard directory and everything that reads it.

A directory without a manifest is not a dataset (the manifest is written last, atomically).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import FORMAT_VERSION
from .haar import tensor_shape

MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
ENCODINGS = ("dwt16", "jpeg")


class DatasetError(RuntimeError):
    """A shard directory that cannot be used; the message says what is wrong and what to do."""


@dataclass
class ShardEntry:
    name: str  # "shard-000000.tar"
    index: str  # "shard-000000.idx"
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardManifest:
    source: dict[str, Any]  # kind, path, found, selected, written, skipped, upscaled, ignored
    image_size: int
    encoding: str  # "dwt16" | "jpeg"
    components: list[str]  # extensions present in every sample
    channel_mean: list[float]  # model-space, 12 channels
    channel_std: list[float]
    shards: list[ShardEntry]
    subset: dict[str, Any] | None = None  # {"fraction": f, "seed": s}
    shuffle_seed: int | None = None
    labels: dict[str, int] | None = None  # identity name -> integer label
    created_at: str = ""
    tool: str = ""
    format: str = "maskdm-shards"
    format_version: int = FORMAT_VERSION
    wavelet: str = "haar"
    dwt_level: int = 1
    subbands: list[str] = field(default_factory=lambda: ["LL", "H", "V", "D"])
    model_space: dict[str, str] = field(default_factory=lambda: {
        "LL": "c/255 - 1", "H": "c/255", "V": "c/255", "D": "c/255"})
    tensor: dict[str, Any] = field(default_factory=dict)  # shape, dtype, byte_order

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.labels) if self.labels else 0

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        return tensor_shape(self.image_size)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        order = ["format", "format_version", "created_at", "tool", "source", "subset",
                 "shuffle_seed", "image_size", "encoding", "components", "wavelet", "dwt_level",
                 "subbands", "tensor", "model_space", "channel_mean", "channel_std", "num_samples",
                 "labels", "shards"]
        return {k: d[k] for k in order}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST) -> "ShardManifest":
        if d.get("format") != "maskdm-shards":
            raise DatasetError(f"{where}: not a maskdm shard manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{where}: format version {d.get('format_version')} is not supported "
                               f"(this maskdm reads version {FORMAT_VERSION}); re-run `maskdm shard`")
        d = dict(d)
        d.pop("num_samples", None)
        try:
            d["shards"] = [ShardEntry(**s) for s in d["shards"]]
            m = cls(**d)
        except (TypeError, KeyError) as e:
            raise DatasetError(f"{where}: malformed manifest ({e}); re-run `maskdm shard`") from None
        if m.encoding not in ENCODINGS:
            raise DatasetError(f"{where}: unknown encoding {m.encoding!r}")
        from .fsutil import plain_name_problem
        for s in m.shards:
            for name in (s.name, s.index):
                if (why := plain_name_problem(name)) is not None:
                    raise DatasetError(f"{where}: shard name {name!r} {why}: a manifest names "
                                       f"only files inside its own folder (this one was not "
                                       f"written by `maskdm shard`, or was tampered with)")
        return m


def load_manifest(directory: str | Path, *, remote=None) -> ShardManifest:
    """Read and check ``DIR/manifest.json`` (``DIR`` may be an s3://, gs:// or http(s):// URL;
    ``remote``: its ``RemoteShards``, if made already); errors say how to fix the directory."""
    from .fsutil import url_refusal
    from .remote import RemoteError, RemoteShards, is_remote
    if is_remote(directory):
        try:
            remote = remote or RemoteShards(str(directory))
            text = remote.read_text(MANIFEST)
        except FileNotFoundError:
            raise DatasetError(f"{directory}/{MANIFEST} does not exist: not a shard folder (an "
                               f"interrupted `maskdm shard ... {directory}` writes it last; "
                               f"re-run it to finish)") from None
        except (ValueError, RemoteError) as e:
            raise DatasetError(str(e)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{directory}/{MANIFEST}: invalid JSON ({e})") from None
        return ShardManifest.from_json(data, f"{str(directory).rstrip('/')}/{MANIFEST}")
    if (refused := url_refusal(directory, "shard folder")) is not None:
        raise DatasetError(refused)
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DatasetError(f"{directory}: no such shard directory; create one with "
                           f"`maskdm shard SRC {directory}`")
    if not path.exists():
        partial = any(directory.glob("shard-*.tar"))
        hint = ("it holds shards but no manifest: an interrupted `maskdm shard`; re-run the same "
                "command to finish it" if partial else "create it with `maskdm shard SRC DIR`")
        raise DatasetError(f"{path} is missing, so {directory} is not a dataset: {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e}); re-run `maskdm shard`") from None
    return ShardManifest.from_json(data, str(path))
