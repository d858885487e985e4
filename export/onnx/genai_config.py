"""genai_config.json (and the processor files it names) so onnxruntime-genai can load a bundle.

Keys follow onnxruntime-genai's config parser (src/config.cpp) for model type "gemma4":
the runtime discovers cache-owning layers from the decoder's past_key_values.%d inputs
and reads each layer's KV heads and head size from the graph, so the shared-KV tail
and the 256/512 head dims need no extra keys. past_present_share_buffer is false: the
decoder concatenates past and new K/V (a plain Attention pattern, not GroupQueryAttention),
and sliding layers mask old positions inside the graph, so no sliding_window section.
"""

from __future__ import annotations

import json

from edgekit import onnx_layout as L
from edgekit.bundle import BundleWriter
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER


def _session_options(providers: tuple[str, ...]) -> dict:
    # onnxruntime-genai names providers without the "ExecutionProvider" suffix ("cuda").
    names = [p.removesuffix("ExecutionProvider").lower() for p in providers if p != "CPUExecutionProvider"]
    return {"log_id": "onnxruntime-genai", "provider_options": [{name: {}} for name in names]}


def build(*, manifest, checkpoint, plan) -> dict:
    text = checkpoint.text_config
    tokens = manifest.special_tokens
    session = _session_options(manifest.execution_providers)
    decoder = {
        "filename": L.GRAPH_FILES[METHOD_TEXT_DECODER],
        "session_options": session,
        "hidden_size": text["hidden_size"],
        "head_size": text["head_dim"],
        "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "inputs": {"inputs_embeds": L.INPUTS_EMBEDS, "per_layer_inputs": L.PER_LAYER_INPUTS,
                   "attention_mask": L.ATTENTION_MASK, "position_ids": L.POSITION_IDS,
                   "past_key_names": L.PAST_KEY, "past_value_names": L.PAST_VALUE},
        "outputs": {"logits": L.LOGITS, "present_key_names": L.PRESENT_KEY, "present_value_names": L.PRESENT_VALUE},
    }
    model = {
        "type": "gemma4",
        "vocab_size": text["vocab_size"],
        "context_length": plan.context_length,
        "bos_token_id": tokens.bos_id,
        "eos_token_id": list(tokens.eos_ids),
        "pad_token_id": tokens.pad_id,
        "image_token_id": tokens.image_token_id,
        "audio_token_id": tokens.audio_token_id,
        "boa_token_id": tokens.boa_id,
        "decoder": decoder,
        "embedding": {
            "filename": L.GRAPH_FILES[METHOD_TOKEN_EMBEDDING], "session_options": session,
            "inputs": {"input_ids": L.INPUT_IDS, "image_features": L.IMAGE_FEATURES,
                       "audio_features": L.AUDIO_FEATURES},
            "outputs": {"inputs_embeds": L.INPUTS_EMBEDS, "per_layer_inputs": L.PER_LAYER_INPUTS},
        },
    }
    if manifest.has_method(METHOD_VISION_ENCODER):
        model["vision"] = {
            "filename": L.GRAPH_FILES[METHOD_VISION_ENCODER], "config_filename": L.VISION_PROCESSOR_FILE,
            "session_options": session,
            "inputs": {"pixel_values": L.PIXEL_VALUES, "pixel_position_ids": L.PIXEL_POSITION_IDS},
            "outputs": {"image_features": L.IMAGE_FEATURES},
        }
    if manifest.has_method(METHOD_AUDIO_ENCODER):
        model["speech"] = {
            "filename": L.GRAPH_FILES[METHOD_AUDIO_ENCODER], "config_filename": L.AUDIO_PROCESSOR_FILE,
            "session_options": session,
            "inputs": {"audio_embeds": L.INPUT_FEATURES, "attention_mask": L.INPUT_FEATURES_MASK},
            "outputs": {"audio_features": L.AUDIO_FEATURES},
        }
    search = {"do_sample": False, "early_stopping": True, "max_length": plan.context_length, "min_length": 0,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def _vision_processor(manifest) -> dict:
    image = manifest.image_preprocessing
    return {"processor": {"name": "gemma4_image_processor", "transforms": [
        {"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "RGB"}}},
        {"operation": {"name": "gemma4_image_transform", "type": "Gemma4ImageTransform",
                       "attrs": {"patch_size": image.patch_size, "max_soft_tokens": image.max_soft_tokens,
                                 "pooling_kernel_size": image.pooling_kernel_size}}}]}}


def _audio_processor(manifest) -> dict:
    audio = manifest.audio_preprocessing
    rate = audio.sampling_rate
    return {"feature_extraction": {"sequence": [
        {"operation": {"name": "audio_decoder", "type": "AudioDecoder"}},
        {"operation": {"name": "gemma4_log_mel", "type": "Gemma4LogMel", "attrs": {
            "feature_size": audio.feature_size, "sampling_rate": rate,
            "frame_length_ms": audio.frame_length * 1000.0 / rate, "hop_length_ms": audio.hop_length * 1000.0 / rate,
            "min_frequency": audio.min_frequency, "max_frequency": audio.max_frequency,
            "preemphasis": audio.preemphasis, "preemphasis_htk_flavor": int(audio.preemphasis_htk_flavor),
            "fft_overdrive": int(bool(audio.extra.get("fft_overdrive", False))), "mel_floor": audio.mel_floor}}}]}}


def write(writer: BundleWriter, *, manifest, checkpoint, plan) -> None:
    writer.write_text(L.GENAI_CONFIG_FILE, json.dumps(build(manifest=manifest, checkpoint=checkpoint, plan=plan),
                                                      indent=2) + "\n")
    if manifest.has_method(METHOD_VISION_ENCODER):
        writer.write_text(L.VISION_PROCESSOR_FILE, json.dumps(_vision_processor(manifest), indent=2) + "\n")
    if manifest.has_method(METHOD_AUDIO_ENCODER):
        writer.write_text(L.AUDIO_PROCESSOR_FILE, json.dumps(_audio_processor(manifest), indent=2) + "\n")
