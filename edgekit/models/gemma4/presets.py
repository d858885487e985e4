"""Model presets: the config.json that `edgekit make-checkpoint` writes.

`e2b-shape` / `e4b-shape` carry the released models' values; `tiny-e2b` / `tiny-e4b`
keep every architectural feature at tiny widths so tests run in seconds. Sources:

- E2B text: google/gemma-4-e2b-it config.json, also in pytorch/executorch
  examples/models/gemma4/config/e2b_config.json: hidden 1536, 35 layers (4 sliding : 1
  global), 8 heads, 1 KV head, head_dim 256 / global 512, intermediate 6144 (double-wide
  on the 20 shared-KV layers), per-layer input 256, sliding window 512, softcap 30.
- E4B text: google/gemma-4-e4b-it config.json (pytorch/executorch
  examples/models/gemma4/config/e4b_config.json): hidden 2560, 42 layers (5 sliding :
  1 global), 2 KV heads, intermediate 10240, 18 shared-KV layers, no double-wide MLP.
- Audio and vision towers: transformers' Gemma4AudioConfig / Gemma4VisionConfig
  defaults, documented there as google/gemma-4-e2b-it's (conformer 1024 x 12, output
  1536; ViT 768 x 16, patch 16, pooling 3).
- Rope: sliding layers theta 1e4; global layers "proportional" rope, theta 1e6, partial
  rotary factor 0.25 (transformers Gemma4TextConfig defaults, same in the released config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from edgekit.models.gemma4.special_tokens import REAL_VOCAB_SIZE, layout_for

ROPE_PARAMETERS = {
    "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
    "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
}


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    hidden_size_per_layer_input: int
    num_kv_shared_layers: int
    sliding_every: int  # every Nth layer is global ("full_attention")
    sliding_window: int
    use_double_wide_mlp: bool
    vocab_size: int
    max_position_embeddings: int = 131_072


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    text: TextShape
    audio: dict[str, Any]
    vision: dict[str, Any]
    # Lets `--layers N` cut depth while keeping the shared-KV tail in proportion.
    default_layers: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_layers", self.text.num_hidden_layers)


def _layer_types(num_layers: int, num_shared: int, every: int) -> list[str]:
    """The released sliding/global pattern, cut to `num_layers`.

    transformers needs both layer types among the cache-owning layers and a global last
    layer, so a cut model gets a global layer where the plain pattern would lack one.
    """
    kinds = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)]
    own = num_layers - num_shared
    if num_shared and "full_attention" not in kinds[:own]:
        kinds[own - 1] = "full_attention"
    if num_shared and "sliding_attention" not in kinds[:own]:
        raise ValueError(f"{own} cache-owning layers cannot hold both a sliding and a global layer")
    kinds[-1] = "full_attention"
    return kinds


def _text_config(shape: TextShape, num_layers: int) -> dict[str, Any]:
    # Keep the released share of KV-reusing tail layers when cutting depth (E2B: 20 of 35).
    if num_layers == shape.num_hidden_layers:
        num_shared = shape.num_kv_shared_layers
    else:
        num_shared = math.floor(num_layers * shape.num_kv_shared_layers / shape.num_hidden_layers)
        num_shared = min(num_shared, num_layers - 2) if num_layers >= 3 else 0
    layer_types = _layer_types(num_layers, num_shared, shape.sliding_every)
    tokens = layout_for(shape.vocab_size)
    return {
        "model_type": "gemma4_text",
        "vocab_size": shape.vocab_size,
        "vocab_size_per_layer_input": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "global_head_dim": shape.global_head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size_per_layer_input": shape.hidden_size_per_layer_input,
        "num_kv_shared_layers": num_shared,
        "layer_types": layer_types,
        "sliding_window": shape.sliding_window,
        "use_double_wide_mlp": shape.use_double_wide_mlp,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": ROPE_PARAMETERS,
        "attention_bias": False,
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
        "pad_token_id": tokens.id("pad_token"),
        "bos_token_id": tokens.id("bos_token"),
        "eos_token_id": tokens.eos_ids,
    }


def build_config(preset: Preset, *, layers: int | None = None) -> dict[str, Any]:
    """The full multimodal config.json for `preset`, optionally cut to `layers` layers."""
    num_layers = layers or preset.text.num_hidden_layers
    if num_layers < 1 or num_layers > preset.text.num_hidden_layers:
        raise ValueError(f"--layers must be between 1 and {preset.text.num_hidden_layers} for {preset.name}")
    tokens = layout_for(preset.text.vocab_size)
    audio = {"model_type": "gemma4_audio", **preset.audio, "output_proj_dims": preset.audio["output_proj_dims"]}
    vision = {"model_type": "gemma4_vision", **preset.vision}
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": _text_config(preset.text, num_layers),
        "audio_config": audio,
        "vision_config": vision,
        "boi_token_id": tokens.id("boi_token"),
        "eoi_token_id": tokens.id("eoi_token"),
        "image_token_id": tokens.id("image_token"),
        "video_token_id": tokens.id("video_token"),
        "boa_token_id": tokens.id("boa_token"),
        "eoa_token_index": tokens.id("eoa_token"),
        "audio_token_id": tokens.id("audio_token"),
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }


# --- released towers (transformers Gemma4AudioConfig / Gemma4VisionConfig defaults) ---
_REAL_AUDIO = {
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "hidden_act": "silu",
    "subsampling_conv_channels": [128, 32],
    "conv_kernel_size": 5,
    "residual_weight": 0.5,
    "attention_chunk_size": 12,
    "attention_context_left": 13,
    "attention_context_right": 0,
    "attention_logit_cap": 50.0,
    "attention_invalid_logits_value": -1.0e9,
    "use_clipped_linears": True,
    "rms_norm_eps": 1e-6,
    "gradient_clipping": 1e10,
    "output_proj_dims": 1536,
}
_REAL_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "pooling_kernel_size": 3,
    "patch_size": 16,
    "position_embedding_size": 10 * 1024,
    "use_clipped_linears": False,
    "standardize": False,
}
# Tiny towers: same structure, tiny widths. The first subsampling conv keeps 128
# channels: the mel-bin count (docs/export-notes.md).
_TINY_AUDIO = {**_REAL_AUDIO, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "subsampling_conv_channels": [128, 16], "output_proj_dims": 48}
_TINY_VISION = {**_REAL_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                "position_embedding_size": 1024}

E2B_TEXT = TextShape(
    hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
    num_key_value_heads=1, head_dim=256, global_head_dim=512, hidden_size_per_layer_input=256,
    num_kv_shared_layers=20, sliding_every=5, sliding_window=512, use_double_wide_mlp=True,
    vocab_size=REAL_VOCAB_SIZE,
)
E4B_TEXT = TextShape(
    hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, global_head_dim=512, hidden_size_per_layer_input=256,
    num_kv_shared_layers=18, sliding_every=6, sliding_window=512, use_double_wide_mlp=False,
    vocab_size=REAL_VOCAB_SIZE,
)
# 10 layers in E2B's 4:1 pattern, 4 of them reusing KV; a 16-token window so tests
# decode past it quickly.
TINY_E2B_TEXT = TextShape(
    hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=16,
    num_kv_shared_layers=4, sliding_every=5, sliding_window=16, use_double_wide_mlp=True,
    vocab_size=4096, max_position_embeddings=4096,
)
TINY_E4B_TEXT = TextShape(
    hidden_size=80, intermediate_size=160, num_hidden_layers=12, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=16,
    num_kv_shared_layers=4, sliding_every=6, sliding_window=16, use_double_wide_mlp=False,
    vocab_size=4096, max_position_embeddings=4096,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-e2b", "E2B architecture at tiny width (tests, demos)", TINY_E2B_TEXT,
               {**_TINY_AUDIO, "output_proj_dims": 48}, _TINY_VISION),
        Preset("tiny-e4b", "E4B architecture at tiny width (tests, demos)", TINY_E4B_TEXT,
               {**_TINY_AUDIO, "output_proj_dims": 48}, _TINY_VISION),
        Preset("e2b-shape", "released E2B widths and vocab (~5.1 B parameters at full depth)", E2B_TEXT,
               _REAL_AUDIO, _REAL_VISION),
        Preset("e4b-shape", "released E4B widths and vocab (~8 B parameters at full depth)", E4B_TEXT,
               _REAL_AUDIO, _REAL_VISION),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; unknown names list the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        from edgekit.errors import InputError

        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


PresetBuilder = Callable[..., dict[str, Any]]
