"""Gemma 4's peak working memory per stage, for the plan's memory estimate.

The stages (audio, vision, decoder) run one after another, so the peak is the largest.
Defaults are transformers' Gemma4VisionConfig / Gemma4AudioConfig (as in param_count).
"""

from __future__ import annotations

from typing import Any, Mapping

from edgekit.compute_shapes import ACTIVATION_BYTES, PREFILL_CHUNK, vision_query_chunk
from edgekit.models.gemma4.limits import AUDIO_MAX_TOKENS, MEL_BINS, MEL_FRAMES_PER_TOKEN
from edgekit.models.gemma4.param_count import text_layers


def activation_bytes(config: Mapping[str, Any], modalities: tuple[str, ...], context: int, vision_tokens: int,
                     chunked_vision: bool, chunk: int = PREFILL_CHUNK) -> int:
    """Peak working memory: the stages (audio, vision, decoder) run one after another; the
    decoder takes `chunk` tokens a call (compute_shapes.prefill_chunk)."""
    stages = [_decoder_activations(config["text_config"], context, chunk)]
    if "vision" in modalities:
        stages.append(_vision_activations(config["vision_config"], vision_tokens, chunked=chunked_vision))
    if "audio" in modalities:
        stages.append(_audio_activations(config["audio_config"]))
    return max(stages)

def _decoder_activations(text: Mapping[str, Any], context: int, chunk: int = PREFILL_CHUNK) -> int:
    layers = text_layers(text)
    chunk, hidden, heads = min(context, chunk), text["hidden_size"], text["num_attention_heads"]
    widest_mlp = max(layer.intermediate_size for layer in layers)
    widest_q = heads * max(layer.head_dim for layer in layers)
    ple = len(layers) * text.get("hidden_size_per_layer_input", 256)
    values = (
        chunk * hidden * 4  # residual, normed input, attention and MLP outputs
        + chunk * widest_mlp * 3  # gate, up, their product
        + chunk * widest_q * 3  # q, attention output, rotary temporaries
        + heads * chunk * context  # scores of a global layer: the chunk against the whole cache
        + chunk * ple * 2  # per-layer inputs: looked up and projected
        + text["vocab_size"]  # logits of the last position only
    )
    return values * ACTIVATION_BYTES


def _vision_activations(vision: Mapping[str, Any], soft_tokens: int, *, chunked: bool = False) -> int:
    # Each soft token pools a k x k block of 16 px patches (pooling_kernel_size 3: 9 patches).
    patches = soft_tokens * vision.get("pooling_kernel_size", 3) ** 2
    h, heads = vision.get("hidden_size", 768), vision.get("num_attention_heads", 12)
    # The attention scores dominate at large budgets: the whole matrix where a graph
    # materialises it (ONNX), one block of queries where the format chunks them.
    values = patches * (3 * vision.get("patch_size", 16) ** 2 + 4 * h + 2 * vision.get("intermediate_size", 3072))
    queries = vision_query_chunk(heads, patches) if chunked else patches
    return (values + heads * queries * patches) * ACTIVATION_BYTES


def _audio_activations(audio: Mapping[str, Any]) -> int:
    frames = AUDIO_MAX_TOKENS * MEL_FRAMES_PER_TOKEN
    c0 = audio.get("subsampling_conv_channels", (128, 32))[0]
    conv = c0 * (frames // 2) * (MEL_BINS // 2)  # first stride-2 conv output, the largest tensor
    conformer = AUDIO_MAX_TOKENS * audio.get("hidden_size", 1024) * 8  # 4x feed-forward plus residual streams
    return (frames * MEL_BINS + conv + conformer) * ACTIVATION_BYTES
