"""A Hugging Face model directory of safetensors shards: finding the shards
(with or without model.safetensors.index.json), their headers, config.json,
and the other files carried over."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .safetensors_io import FormatError, TensorInfo, read_header

INDEX_FILE = "model.safetensors.index.json"
# Weight files in other formats: not carried over (they would hold the unquantized model).
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")


class CheckpointError(Exception):
    """A user mistake or unusable input: one line for the CLI."""


@dataclass
class Source:
    path: Path
    shards: list[str]  # file names, in order
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    metadata: dict[str, dict] = field(default_factory=dict)
    index: dict | None = None
    config: dict | None = None

    def shard_path(self, shard: str) -> Path:
        return self.path / shard

    def all_tensors(self):
        for shard in self.shards:
            for name, info in self.headers[shard].items():
                yield shard, name, info

    def extra_files(self) -> list[Path]:
        """Files carried over as they are (tokenizer, generation config, ...)."""
        skip = set(self.shards) | {INDEX_FILE, "config.json"}
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.name not in skip and not p.name.startswith(".")
                      and not p.name.endswith(".safetensors") and not p.name.endswith(OTHER_WEIGHTS))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def open_source(path) -> Source:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    index = None
    if (path / INDEX_FILE).is_file():
        index = _read_json(path / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX_FILE}: no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} names shards that are not there: {', '.join(missing)}")
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no .safetensors files (and no {INDEX_FILE})")
    source = Source(path, shards, index=index)
    config_path = path / "config.json"
    source.config = _read_json(config_path) if config_path.is_file() else None
    for shard in shards:
        try:
            source.headers[shard], source.metadata[shard] = read_header(path / shard)
        except FormatError as exc:
            raise CheckpointError(str(exc)) from None
    if index is not None:
        for name, shard in index["weight_map"].items():
            if name not in source.headers[shard]:
                raise CheckpointError(f"{path / INDEX_FILE}: {name} is not in {shard}")
    return source
