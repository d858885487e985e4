"""A second model family, written as a user would add one: this folder and one line in
edgekit.models.FAMILIES (the test adds the line). A plain decoder-only text model: no
per-layer table, no towers, every layer global; what planning needs and nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from edgekit.errors import CheckpointError
from edgekit.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING
from edgekit.models.family import AudioLimits, ComponentParams, ModelFamily, TextLayer, Towers


def _check_config(config: dict[str, Any], path: Path) -> None:
    text = config.get("text_config")
    if not isinstance(text, dict) or not all(isinstance(text.get(k), int) and text[k] > 0
                                             for k in ("hidden_size", "num_hidden_layers", "vocab_size")):
        raise CheckpointError(f"{path}: text_config needs positive hidden_size, num_hidden_layers, vocab_size")


def _text_layers(text: Mapping[str, Any]) -> list[TextLayer]:
    h = text["hidden_size"]
    return [TextLayer(index=i, kind="full_attention", head_dim=h // text["num_attention_heads"],
                      num_kv_heads=text["num_attention_heads"], shares_kv=False, intermediate_size=4 * h,
                      has_v_proj=True) for i in range(text["num_hidden_layers"])]


def _count_parameters(config: Mapping[str, Any]) -> dict[str, ComponentParams]:
    text = config["text_config"]
    h, n, v = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    return {METHOD_TOKEN_EMBEDDING: ComponentParams(METHOD_TOKEN_EMBEDDING, embedding=v * h),
            METHOD_TEXT_DECODER: ComponentParams(METHOD_TEXT_DECODER, linear=n * 12 * h * h, other=(2 * n + 1) * h)}


def _unavailable(*_: Any) -> Any:
    raise NotImplementedError("the toy family plans only")


FAMILY = ModelFamily(
    name="toy",
    display_name="Toy",
    description="decoder-only text model used to test the family seam",
    model_types=("toy",),
    sizes={"toy-small": (64, 2)},
    check_config=_check_config,
    count_parameters=_count_parameters,
    text_layers=_text_layers,
    towers=lambda config: Towers(available=("text",), unsupported={}),
    activation_bytes=lambda config, modalities, context, vision_tokens, chunked, chunk: 4 * context * config["text_config"]["hidden_size"],
    audio=AudioLimits(ms_per_token=40, max_tokens=0),
    vision_token_budgets=(),
    presets={},
    ignored_tensors=lambda name: False,
    tensor_specs=_unavailable,
    reference_model=_unavailable,
)
