"""Gemma 4 (E2B, E4B): the model family edgekit was built for.

Sources: transformers 5.23 `transformers/models/gemma4/` (the numerical reference) and
the released google/gemma-4-e2b-it / e4b-it configs. The export-ready torch modules live
in edgekit.export.components (host side).
"""

from __future__ import annotations

import re

from edgekit.models.family import AudioLimits, ModelFamily
from edgekit.models.gemma4 import config, limits, memory, param_count, presets

# transformers drops these from real checkpoints on load (shared-KV layers own no K/V:
# Gemma4TextModel._keys_to_ignore_on_load_unexpected); the tied lm_head may be stored too.
_IGNORED_TENSORS = re.compile(r"(.*layers\.\d+\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\..*|lm_head\.weight)")


def _tensor_specs(cfg: dict) -> list:
    from edgekit.models.gemma4.tensor_specs import tensor_specs

    return tensor_specs(cfg)


def _reference_model(path, dtype: str = "float32"):
    from edgekit.models.gemma4.tensor_specs import reference_model

    return reference_model(path, dtype)


FAMILY = ModelFamily(
    name="gemma4",
    display_name="Gemma 4",
    description="Gemma 4 E2B / E4B: text decoder with per-layer embeddings, audio conformer, vision encoder",
    model_types=("gemma4",),
    # google/gemma-4-e2b-it and -e4b-it config.json (edgekit.models.gemma4.presets).
    sizes={"e2b": (1536, 35), "e4b": (2560, 42)},
    check_config=config.check_config,
    count_parameters=param_count.count_parameters,
    text_layers=param_count.text_layers,
    towers=config.towers,
    activation_bytes=memory.activation_bytes,
    audio=AudioLimits(ms_per_token=limits.AUDIO_MS_PER_TOKEN, max_tokens=limits.AUDIO_MAX_TOKENS),
    vision_token_budgets=limits.VISION_TOKEN_BUDGETS,
    presets=presets.PRESETS,
    ignored_tensors=lambda name: _IGNORED_TENSORS.fullmatch(name) is not None,
    tensor_specs=_tensor_specs,
    reference_model=_reference_model,
)
