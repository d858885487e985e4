"""Parameter counts per component, computed from config.json alone (no torch).

Mirrors the module tree of transformers' Gemma4ForConditionalGeneration
(transformers/models/gemma4/modeling_gemma4.py, 5.23) and must equal
`sum(p.numel() for p in model.parameters())` exactly; tests check it against a model
built on the meta device. Buffers (clip bounds, layer scalars, rotary tables) are not
parameters and are left out.

Components are keyed by bundle method name (edgekit.manifest), plus the per-layer
embedding table, which is counted apart because it stays memory-mapped:

    token_embedding       embed_tokens (the tied lm_head is the same tensor: counted once)
    per_layer_embedding   embed_tokens_per_layer: vocab_per_layer x (layers * per-layer dim)
    text_decoder          layers, final norm, per-layer model projection + norm (+ untied lm_head)
    audio_encoder         audio tower + embed_audio
    vision_encoder        vision tower + embed_vision

Each component is split by weight kind (edgekit.recipes.WEIGHT_KINDS), which is what
quantization recipes match on. The result types are the family interface's
(edgekit.models.family).
"""

from __future__ import annotations

from typing import Any, Mapping

from edgekit.errors import CheckpointError
from edgekit.models.family import PER_LAYER_EMBEDDING, ComponentParams, TextLayer
from edgekit.manifest import (
    METHOD_AUDIO_ENCODER,
    METHOD_TEXT_DECODER,
    METHOD_TOKEN_EMBEDDING,
    METHOD_VISION_ENCODER,
)

# --- config access -----------------------------------------------------------------------


def _int(cfg: Mapping[str, Any], key: str, section: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"config.json: {section}.{key} must be a non-negative integer, got {value!r}")
    return value


def text_layers(text: Mapping[str, Any]) -> list[TextLayer]:
    """Per-layer shapes from a text_config dict (transformers' Gemma4TextConfig rules)."""
    n = _int(text, "num_hidden_layers", "text_config")
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)  # transformers' default
    ]
    if len(layer_types) != n:
        raise CheckpointError(f"config.json: text_config.layer_types has {len(layer_types)} entries for {n} layers")
    layer_types = [*layer_types[:-1], "full_attention"]  # transformers forces a global last layer
    shared = _int(text, "num_kv_shared_layers", "text_config", 0)
    head_dim = _int(text, "head_dim", "text_config")
    kv_heads = _int(text, "num_key_value_heads", "text_config")
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    overrides = _per_layer_overrides(text, layer_types, k_eq_v)
    inter = _int(text, "intermediate_size", "text_config")
    double_wide = bool(text.get("use_double_wide_mlp", False))
    layers = []
    for i, kind in enumerate(layer_types):
        o = overrides.get(i, {})
        shares = i >= n - shared
        layers.append(TextLayer(
            index=i, kind=kind, head_dim=o.get("head_dim", head_dim), num_kv_heads=o.get("num_key_value_heads", kv_heads),
            shares_kv=shares,
            # use_double_wide_mlp widens only the KV-sharing layers (Gemma4TextMLP).
            intermediate_size=inter * (2 if double_wide and shares else 1),
            # attention_k_eq_v: global layers reuse K as V, so they own no v_proj.
            has_v_proj=not (k_eq_v and kind != "sliding_attention"),
        ))
    return layers


def _per_layer_overrides(text: Mapping[str, Any], layer_types: list[str], k_eq_v: bool) -> dict[int, dict[str, int]]:
    # A config saved by transformers carries `per_layer_config`; a released one carries
    # `global_head_dim` (+ `num_global_key_value_heads`), which transformers expands.
    if text.get("per_layer_config"):
        return {int(k): dict(v) for k, v in text["per_layer_config"].items()}
    o: dict[str, int] = {"head_dim": _int(text, "global_head_dim", "text_config", 512)}
    if k_eq_v and text.get("num_global_key_value_heads") is not None:
        o["num_key_value_heads"] = _int(text, "num_global_key_value_heads", "text_config")
    return {i: o for i, kind in enumerate(layer_types) if kind == "full_attention"}


# --- components --------------------------------------------------------------------------


def _text_components(text: Mapping[str, Any], *, tied: bool) -> list[ComponentParams]:
    if text.get("enable_moe_block"):
        raise CheckpointError("config.json: text_config.enable_moe_block is set; edgekit supports the dense E2B/E4B")
    hidden = _int(text, "hidden_size", "text_config")
    vocab = _int(text, "vocab_size", "text_config")
    heads = _int(text, "num_attention_heads", "text_config")
    ple_dim = _int(text, "hidden_size_per_layer_input", "text_config", 256)
    ple_vocab = _int(text, "vocab_size_per_layer_input", "text_config", 262_144)
    bias = bool(text.get("attention_bias", False))
    layers = text_layers(text)
    n = len(layers)

    linear = other = 0
    for layer in layers:
        q, kv = heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
        linear += hidden * q + q * hidden  # q_proj, o_proj
        other += layer.head_dim + (q + hidden if bias else 0)  # q_norm (+ q/o biases)
        if not layer.shares_kv:
            n_kv = 2 if layer.has_v_proj else 1
            linear += n_kv * hidden * kv
            other += layer.head_dim + (n_kv * kv if bias else 0)  # k_norm (v_norm has no scale)
        linear += 3 * hidden * layer.intermediate_size  # gate, up, down
        other += 4 * hidden  # input / post-attention / pre- and post-feedforward norms
        if ple_dim:
            linear += 2 * hidden * ple_dim  # per_layer_input_gate, per_layer_projection
            other += hidden  # post_per_layer_input_norm
    other += hidden  # final norm
    if ple_dim:
        linear += hidden * n * ple_dim  # per_layer_model_projection
        other += ple_dim  # per_layer_projection_norm
    return [
        ComponentParams(METHOD_TOKEN_EMBEDDING, embedding=vocab * hidden),
        ComponentParams(PER_LAYER_EMBEDDING, embedding=ple_vocab * n * ple_dim if ple_dim else 0),
        ComponentParams(METHOD_TEXT_DECODER, linear=linear, other=other, lm_head=0 if tied else vocab * hidden),
    ]


def _audio_component(audio: Mapping[str, Any], text_hidden: int) -> ComponentParams:
    s = "audio_config"
    h = _int(audio, "hidden_size", s, 1024)
    heads = _int(audio, "num_attention_heads", s, 8)
    kernel = _int(audio, "conv_kernel_size", s, 5)
    c0, c1 = audio.get("subsampling_conv_channels", (128, 32))
    out = _int(audio, "output_proj_dims", s, 1536)
    attn = heads * (h // heads)
    # Subsampling: two 3x3 convs, each with a bias-free LayerNorm, then a linear projection.
    other = 9 * c0 + c0 + 9 * c0 * c1 + c1
    linear = (c0 // 4) * c1 * h
    per_layer_linear = (
        2 * (h * 4 * h + 4 * h * h)  # feed_forward1 / feed_forward2
        + 3 * h * attn + h * h + h * attn  # q, k, v, post, relative_k_proj
        + h * 2 * h + h * h  # light conv: linear_start (GLU), linear_end
    )
    per_layer_other = 2 * 2 * h + (h // heads) + h * kernel + 2 * h + 3 * h  # ffn norms, per_dim_scale, depthwise, norms
    n = _int(audio, "num_hidden_layers", s, 12)
    linear += n * per_layer_linear + h * out + out * text_hidden  # output_proj, embed_audio projection
    other += n * per_layer_other + out  # output_proj bias
    return ComponentParams(METHOD_AUDIO_ENCODER, linear=linear, other=other)


def _vision_component(vision: Mapping[str, Any], text_hidden: int) -> ComponentParams:
    s = "vision_config"
    h = _int(vision, "hidden_size", s, 768)
    heads = _int(vision, "num_attention_heads", s, 12)
    kv_heads = _int(vision, "num_key_value_heads", s, 12)
    hd = _int(vision, "head_dim", s, h // heads)
    inter = _int(vision, "intermediate_size", s, 3072)
    patch = _int(vision, "patch_size", s, 16)
    n = _int(vision, "num_hidden_layers", s, 16)
    per_layer_linear = h * heads * hd * 2 + h * kv_heads * hd * 2 + 3 * h * inter  # q, o, k, v, mlp
    per_layer_other = 2 * hd + 4 * h  # q_norm, k_norm, four layer norms
    mm_dim = _int(vision, "output_proj_dims", s, h)  # Gemma4MultimodalEmbedder's getattr fallback
    linear = 3 * patch * patch * h + n * per_layer_linear + mm_dim * text_hidden
    other = 2 * _int(vision, "position_embedding_size", s, 10 * 1024) * h + n * per_layer_other
    return ComponentParams(METHOD_VISION_ENCODER, linear=linear, other=other)


def count_parameters(config: Mapping[str, Any]) -> dict[str, ComponentParams]:
    """Parameters per component of a Gemma 4 config.json dict; absent towers are left out."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        raise CheckpointError("config.json has no text_config")
    # The top-level flag decides, defaulting to tied whatever text_config says (as in transformers).
    tied = bool(config.get("tie_word_embeddings", True))
    parts = _text_components(text, tied=tied)
    hidden = text["hidden_size"]
    if isinstance(config.get("audio_config"), Mapping):
        parts.append(_audio_component(config["audio_config"], hidden))
    if isinstance(config.get("vision_config"), Mapping):
        parts.append(_vision_component(config["vision_config"], hidden))
    return {p.name: p for p in parts}


def total_parameters(config: Mapping[str, Any]) -> int:
    return sum(p.total for p in count_parameters(config).values())
