"""Load and validate a checkpoint directory (a downloaded one or one edgekit wrote).

Validation reads only config.json and the safetensors headers, so a broken checkpoint
is reported in one line before anything big is read: missing files, a model of no
family edgekit knows (edgekit.models), values its family refuses, truncated or corrupt
shards, tensors whose shapes disagree with the config.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edgekit.errors import CheckpointError
from edgekit.models import family_for_config
from edgekit.models.family import ModelFamily

TOKENIZER_FILES = ("tokenizer.json",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, checked by the model family that reads it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    try:
        family = family_for_config(config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} is {exc}") from None
    family.check_config(config, cfg_path)
    return config


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse a .safetensors header without torch, and check the file is complete."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"weights file {path.name} is truncated (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100 * 1024**2):
                raise CheckpointError(f"weights file {path.name} is corrupt (header length {header_len})")
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"weights file {path.name} is corrupt (unreadable header)") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc.strerror}") from None
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = (meta["dtype"], tuple(int(d) for d in meta["shape"]))
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"weights file {path.name} is corrupt (bad entry for {name})") from None
    if size < 8 + header_len + end:
        raise CheckpointError(
            f"weights file {path.name} is truncated: {size} bytes, header promises {8 + header_len + end}"
        )
    return SafetensorsHeader(path=path, tensors=tensors)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it is sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is corrupt (no weight_map)") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing weight shard {missing[0]} (listed in {INDEX_FILE})")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"checkpoint {path} has no weights ({SINGLE_FILE} or {INDEX_FILE})")


@dataclass
class Checkpoint:
    """A validated checkpoint directory. Heavy objects are built on first use."""

    path: Path
    config: dict[str, Any]
    headers: list[SafetensorsHeader] = field(repr=False)

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config["text_config"]

    @property
    def has_audio(self) -> bool:
        return self.config.get("audio_config") is not None

    @property
    def has_vision(self) -> bool:
        return self.config.get("vision_config") is not None

    @cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for h in self.headers for name, (_, shape) in h.tensors.items()}

    @property
    def family(self) -> ModelFamily:
        return family_for_config(self.config)

    def reference_model(self, *, dtype: str = "float32"):
        """The transformers eager model, the numerical reference for every parity check."""
        return self.family.reference_model(self.path, dtype)


def load(path: Path | str, *, check_shapes: bool = True) -> Checkpoint:
    """Validate and open a checkpoint directory.

    `check_shapes` compares every tensor with the shapes the config implies, which
    builds the model on the meta device (needs torch + transformers, no weights read).
    """
    path = Path(path)
    config = read_config(path)
    files = weight_files(path)
    headers = [read_safetensors_header(f) for f in files]
    for name in TOKENIZER_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no tokenizer ({name})")
    _check_tokenizer(path / TOKENIZER_FILES[0], vocab_size=config["text_config"]["vocab_size"])
    checkpoint = Checkpoint(path=path, config=config, headers=headers)
    if check_shapes:
        _check_shapes(checkpoint)
    return checkpoint


def _check_tokenizer(path: Path, *, vocab_size: int) -> None:
    """The tokenizer loads and fits the model's vocabulary, checked before an export's work
    (the bundle copies it at the end, and a runner would fail on it at start)."""
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own Exception type for any parse error
        raise CheckpointError(f"{path} is not a tokenizer the tokenizers library reads "
                              f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if size > vocab_size:
        raise CheckpointError(f"{path} has {size} tokens, more than the model's vocab_size {vocab_size}")


def _check_shapes(checkpoint: Checkpoint) -> None:
    family = checkpoint.family
    try:
        expected = {s.name: s.shape for s in family.tensor_specs(checkpoint.config)}
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint.path}/config.json is not a valid {family.name} config: {exc}") from None
    found = checkpoint.tensor_shapes
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"checkpoint {checkpoint.path} is missing tensor {name}")
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(found[name])} but config.json implies {list(shape)}"
            )
    unexpected = [n for n in found if n not in expected and not family.ignored_tensors(n)]
    if unexpected:
        raise CheckpointError(f"checkpoint {checkpoint.path} has a tensor the config does not describe: {unexpected[0]}")
