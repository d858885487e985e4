"""Names of the ONNX graphs and their inputs/outputs, shared by exporter and runner.

They follow onnxruntime-genai's multimodal layout for Gemma 4 (its defaults in
src/config.h and the mobius exporter's Gemma 4 graphs) so the same bundle loads there:
an `embedding` graph that also places the encoders' soft tokens, a `decoder` graph with
past/present only for cache-owning layers, a `vision` graph and a `speech` graph.
"""

from __future__ import annotations

from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER

GRAPH_FILES = {
    METHOD_TOKEN_EMBEDDING: "embedding.onnx",
    METHOD_TEXT_DECODER: "decoder.onnx",
    METHOD_VISION_ENCODER: "vision_encoder.onnx",
    METHOD_AUDIO_ENCODER: "audio_encoder.onnx",
}
GENAI_CONFIG_FILE = "genai_config.json"
VISION_PROCESSOR_FILE = "image_processor.json"
AUDIO_PROCESSOR_FILE = "audio_feature_extraction.json"

# embedding graph
INPUT_IDS = "input_ids"
IMAGE_FEATURES = "image_features"
AUDIO_FEATURES = "audio_features"
INPUTS_EMBEDS = "inputs_embeds"
PER_LAYER_INPUTS = "per_layer_inputs"
# decoder graph
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# optional: logits of the last K positions only (0, the default: all; onnxruntime-genai feeds none)
LOGITS_TO_KEEP = "logits_to_keep"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
# vision graph
PIXEL_VALUES = "pixel_values"
PIXEL_POSITION_IDS = "pixel_position_ids"
# speech graph
INPUT_FEATURES = "input_features"
INPUT_FEATURES_MASK = "input_features_mask"

# dynamic dims
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"
# sliding layers' past may hold fewer positions (the last window - 1: edgekit's runner)
SLIDING_PAST_SEQUENCE = "sliding_past_sequence_length"
SLIDING_TOTAL_SEQUENCE = "sliding_total_sequence_length"
NUM_IMAGE_TOKENS = "num_image_tokens"
NUM_AUDIO_TOKENS = "num_audio_tokens"
NUM_PATCHES = "num_patches"
NUM_FRAMES = "num_frames"
