"""Gemma 4 config.json checks, made before anything is planned or read.

Every value the pipeline divides by, indexes with or allocates from is checked here with
its key named, so a bad config is one CheckpointError instead of a ZeroDivisionError or
an IndexError minutes into an export. Keys and defaults follow transformers 5.23's
Gemma4TextConfig / Gemma4AudioConfig / Gemma4VisionConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from edgekit.errors import CheckpointError
from edgekit.models.family import Towers

LAYER_TYPES = ("sliding_attention", "full_attention")
# Positive integers the text decoder is built from (required, or defaulted by transformers).
_TEXT_REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size")
_TEXT_POSITIVE = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
_TEXT_OPTIONAL_POSITIVE = ("global_head_dim", "sliding_window", "max_position_embeddings",
                           "hidden_size_per_layer_input", "vocab_size_per_layer_input")
_TOWER_POSITIVE = {
    "audio_config": ("hidden_size", "num_hidden_layers", "num_attention_heads"),
    "vision_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                      "pooling_kernel_size", "intermediate_size"),
}


def _positive(section: Mapping[str, Any], key: str, where: str, *, required: bool) -> None:
    if key not in section or section[key] is None:
        if required:
            raise CheckpointError(f"{where}.{key} is missing or not an integer")
        return
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}.{key} must be a positive integer, got {value!r}")


def check_config(config: dict[str, Any], path: Path) -> None:
    where = f"{path}: text_config"
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{path} has no text_config")
    for key in _TEXT_REQUIRED:
        _positive(text, key, where, required=True)
    for key in _TEXT_POSITIVE:
        _positive(text, key, where, required=key in text)
    for key in _TEXT_OPTIONAL_POSITIVE:
        _positive(text, key, where, required=False)
    layers = text["num_hidden_layers"]
    shared = text.get("num_kv_shared_layers", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared < layers:
        raise CheckpointError(f"{where}.num_kv_shared_layers must be an integer from 0 to num_hidden_layers - 1 "
                              f"({layers - 1}), got {shared!r}")
    layer_types = text.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise CheckpointError(f"{where}.layer_types must list one type per layer ({layers})")
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES}, key=str)
        if unknown:
            raise CheckpointError(f"{where}.layer_types has unknown type {unknown[0]!r}; "
                                  f"expected {' or '.join(LAYER_TYPES)}")
    heads, kv_heads = text.get("num_attention_heads", 8), text.get("num_key_value_heads", 1)
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise CheckpointError(f"{where}.num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({kv_heads})")
    for section, keys in _TOWER_POSITIVE.items():
        tower = config.get(section)
        if tower is None:
            continue
        if not isinstance(tower, dict):
            raise CheckpointError(f"{path}: {section} must be an object or null")
        for key in keys:
            _positive(tower, key, f"{path}: {section}", required=False)


def towers(config: Mapping[str, Any]) -> Towers:
    available = ("text", *(m for m in ("audio", "vision") if isinstance(config.get(f"{m}_config"), Mapping)))
    # Larger Gemma 4 configs let image tokens attend to each other both ways in the decoder;
    # the exported decoders are causal everywhere (E2B / E4B leave it unset).
    bidirectional = (config.get("text_config") or {}).get("use_bidirectional_attention")
    if bidirectional == "all":
        raise CheckpointError("this checkpoint's text decoder is bidirectional (use_bidirectional_attention "
                              "'all'): edgekit exports causal decoders only")
    unsupported = {"vision": "its decoder attends both ways over image tokens (use_bidirectional_attention "
                             "'vision'), which edgekit's causal decoders do not"} if bidirectional == "vision" else {}
    return Towers(available=available, unsupported=unsupported)
