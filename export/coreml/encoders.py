"""Gemma 4's vision and audio encoders as standalone Core ML ML programs (iOS 18 / macOS 15).

The same modules ONNX and ExecuTorch export (export/components/vision_encoder.py,
audio_encoder.py), traced with torch.jit.trace and converted by coremltools 9.0
(`convert_to="mlprogram"`). Unlike ExecuTorch's PackedEncoder, nothing is appended to the
soft tokens: the Core ML decoder takes inputs_embeds and per_layer_inputs separately.

Core ML programs here have fixed shapes, and Core ML has neither bool nor int64 inputs or
outputs:

- vision: one program at the profile's soft-token budget, P = budget * k^2 patches. Feed
  the image processor's patches padded with zeros and positions (-1, -1) up to P.
  pixel_position_ids is int32 and stays int32 inside (torch_ops.py: fp16 would round
  positions past 2048); attention is Core ML's fused scaled_dot_product_attention.
- audio: one multifunction .mlpackage, one function per fixed bucket of mel frames,
  named `frames_<N>` (bucket_function_name). The runner pads the clip's frames with zeros
  and input_features_mask with 0 up to the smallest bucket that holds it (pick_bucket);
  padded frames do not change the valid tokens (audio_encoder.py). Functions share
  their weights (coremltools deduplicates constants when it saves the package).
- masks are int32 (1 = valid), in and out; soft tokens float32 (what the ONNX and
  ExecuTorch encoders return; under float16 compute one cast at the end).

Runner contract: keep `soft_tokens[0, mask[0] == 1]`, a prefix, as the other formats.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.models.gemma4.modeling_gemma4 import repeat_kv

from edgekit.errors import ExportError, InputError, require
from edgekit.export.components.audio_encoder import FRAME_MULTIPLE, MAX_FRAMES, AudioEncoder
from edgekit.export.components.vision_encoder import VisionEncoder
from edgekit.export.coreml.torch_ops import register_torch_ops

if TYPE_CHECKING:
    import coremltools as ct

Precision = Literal["float16", "float32"]

# Input and output names, for the runner and the exporter's manifest.
VISION_INPUTS = ("pixel_values", "pixel_position_ids")
VISION_OUTPUTS = ("soft_tokens", "valid_mask")
AUDIO_INPUTS = ("input_features", "input_features_mask")
AUDIO_OUTPUTS = ("soft_tokens", "token_mask")

# The audio attention's masked logits: transformers fills -1e9, which is -inf in fp16, and a
# query whose whole window is padding (a bucket's tail) then gets softmax(-inf, ...) = NaN.
# The logits are tanh-capped to +-attention_logit_cap (50) first, so -1e4 (finite in fp16)
# still weighs exactly 0 next to any real key, and a padded query gets a uniform row as in
# fp32 torch.
AUDIO_MASKED_LOGIT = -1e4

# Default buckets: the shortest 2 s, each next one twice as long, the last exactly 30 s.
SHORTEST_BUCKET_FRAMES = 200
BUCKET_GROWTH = 2.0


# --- audio buckets -----------------------------------------------------------------------
def audio_buckets(max_frames: int = MAX_FRAMES, *, min_frames: int, shortest: int = SHORTEST_BUCKET_FRAMES,
                  growth: float = BUCKET_GROWTH) -> tuple[int, ...]:
    """Frame counts of the audio functions: `shortest`, then x`growth` each, up to and
    including `max_frames`; each a multiple of 4 frames (one soft token) and >= min_frames.

    The encoder's cost is linear in frames (local chunked attention), so a clip in bucket
    b pays at most growth x its own length (the shortest bucket aside): with the defaults
    200, 400, 800, 1600, 3000 frames (2, 4, 8, 16, 30 s), at most 2x, in five functions
    that share one copy of the weights.
    """
    if growth <= 1:
        raise InputError(f"bucket growth must be > 1, got {growth}")
    if max_frames % FRAME_MULTIPLE:
        raise InputError(f"max_frames must be a multiple of {FRAME_MULTIPLE}, got {max_frames}")
    frames = _round_up(max(shortest, min_frames), FRAME_MULTIPLE)
    buckets = []
    while frames < max_frames:
        buckets.append(frames)
        frames = _round_up(math.ceil(frames * growth), FRAME_MULTIPLE)
    return (*buckets, max_frames)


def pick_bucket(frames: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `frames` mel frames."""
    fitting = [b for b in sorted(buckets) if b >= frames]
    if not fitting:
        raise InputError(f"{frames} mel frames exceed the largest audio bucket ({max(buckets)} frames)")
    return fitting[0]


def bucket_function_name(frames: int) -> str:
    """The multifunction package's function for a bucket of `frames` mel frames."""
    return f"frames_{frames}"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --- vision attention: Core ML's fused scaled_dot_product_attention ----------------------
FUSED_SDPA = "edgekit_coreml_fused_sdpa"  # the name transformers' AttentionInterface knows it by


def fused_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention as one F.scaled_dot_product_attention call without `scale`
    and with a bool mask, which coremltools maps to Core ML's fused op (iOS 18) instead of
    matmul + softmax over a whole [heads, P, P] score tensor (150 MB in fp16 for E2B's tower at
    2520 patches). The fused op has no scale: it divides by sqrt(head_dim), so `scaling` is
    folded into the queries. query [B,H,Q,D], mask [B,1,1,K] additive: VisionEncoder's 0
    (attend) or NEG_INF (padding), which the bool mask says without fp16's -inf.
    Returns [B,Q,H,D] as every transformers attention function does.
    """
    if scaling is not None:
        query = query * (scaling * query.shape[-1] ** 0.5)
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    mask = None if attention_mask is None else attention_mask == 0
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FUSED_SDPA, fused_sdpa_attention)


def coreml_vision_encoder(lm, *, budget: int) -> VisionEncoder:
    """VisionEncoder whose attention layers use fused_sdpa_attention, through config copies
    of their own (the loaded model keeps its attention implementation)."""
    encoder = VisionEncoder(lm, max_soft_tokens=budget).eval()
    for module in encoder.layers.modules():  # clones (bake_clipped_linears), but the config is shared
        if hasattr(module, "q_proj") and hasattr(module, "config"):
            config = copy.copy(module.config)
            config._attn_implementation_internal = FUSED_SDPA
            module.config = config
    return encoder


# --- traced modules: Core ML's input and output dtypes ------------------------------------
class _VisionProgram(nn.Module):
    """VisionEncoder with int32 positions in and an int32 mask out."""

    def __init__(self, encoder: VisionEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, valid = self.encoder(pixel_values, pixel_position_ids.long())
        return tokens, valid.int()


class _AudioProgram(nn.Module):
    """AudioEncoder with an int32 frame mask in and an int32 token mask out."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, token_mask = self.encoder(input_features, input_features_mask.bool())
        return tokens, token_mask.int()


def coreml_audio_encoder(lm, *, precision: Precision) -> AudioEncoder:
    """AudioEncoder with constants Core ML's fp16 can hold, set on its own module clones and
    config copies (the loaded model keeps its values):

    - masked attention logits AUDIO_MASKED_LOGIT instead of -1e9;
    - float16: the conformer's clamps at +-gradient_clipping (1e10 in the released config)
      at most +-65504, fp16's largest value. A bound fp16 cannot hold keeps coremltools from
      casting the clamp to fp16, so each of them ran in fp32 between two casts; at 65504
      it is the same clamp in fp16 (larger values would be inf there).
    """
    encoder = AudioEncoder(lm).eval()
    for layer in encoder.layers:  # clones (bake_clipped_linears), but the config is shared
        config = copy.copy(layer.self_attn.config)
        config.attention_invalid_logits_value = AUDIO_MASKED_LOGIT
        layer.self_attn.config = config
    if precision == "float16":
        fp16_max = float(torch.finfo(torch.float16).max)
        for module in encoder.layers.modules():
            if hasattr(module, "gradient_clipping"):
                module.gradient_clipping = min(float(module.gradient_clipping), fp16_max)
    return encoder


# --- conversion --------------------------------------------------------------------------
def _convert(module: nn.Module, example: tuple[torch.Tensor, torch.Tensor], *, inputs: tuple[str, str],
             outputs: tuple[str, str], precision: Precision) -> "ct.models.MLModel":
    """Trace `module` on `example` (a float tensor and an int32 one) and convert it to an
    iOS 18 ML program: float32 and int32 in, float32 soft tokens and an int32 mask out."""
    ct = require("coremltools", extra="export")
    if precision not in ("float16", "float32"):
        raise InputError(f"Core ML compute precision must be float16 or float32, got {precision!r}")
    register_torch_ops()
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example)
    features, ints = example
    try:
        return ct.convert(
            traced,
            inputs=[ct.TensorType(inputs[0], shape=tuple(features.shape), dtype=np.float32),
                    ct.TensorType(inputs[1], shape=tuple(ints.shape), dtype=np.int32)],
            outputs=[ct.TensorType(outputs[0], dtype=np.float32), ct.TensorType(outputs[1], dtype=np.int32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision(precision),
        )
    except (NotImplementedError, ValueError, RuntimeError) as exc:
        raise ExportError(f"coremltools could not convert {type(module).__name__}: {exc}") from exc


def convert_vision_encoder(lm, *, budget: int, precision: Precision = "float16") -> "ct.models.MLModel":
    """The vision encoder at `budget` soft tokens as an ML program (not saved).

    Inputs pixel_values [1,P,3*patch^2] float32, pixel_position_ids [1,P,2] int32 with
    P = budget * k^2; outputs soft_tokens [1,budget,H] float32, valid_mask [1,budget] int32.
    """
    if getattr(lm.model, "vision_tower", None) is None:
        raise ExportError("this checkpoint has no vision tower")
    encoder = coreml_vision_encoder(lm, budget=budget)
    pixels, positions = encoder.example_inputs()
    return _convert(_VisionProgram(encoder), (pixels, positions.int()), inputs=VISION_INPUTS,
                    outputs=VISION_OUTPUTS, precision=precision)


def convert_audio_encoder(lm, *, buckets: tuple[int, ...], precision: Precision = "float16", out: Path,
                          compress: Callable[["ct.models.MLModel"], "ct.models.MLModel"] = lambda m: m) -> Path:
    """The audio encoder as one multifunction .mlpackage at `out`, one function per bucket
    (bucket_function_name), the largest bucket the default function; returns `out`.

    Function `frames_<N>`: inputs input_features [1,N,128] float32, input_features_mask
    [1,N] int32; outputs soft_tokens [1,N/4,H] float32, token_mask [1,N/4] int32.
    An existing package at `out` is replaced once the new one is complete. `compress` stores
    each function's weights as the recipe says (equal results are stored once).
    """
    ct = require("coremltools", extra="export")
    if getattr(lm.model, "audio_tower", None) is None:
        raise ExportError("this checkpoint has no audio tower")
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise InputError(f"the audio encoder is written as an .mlpackage, got {out}")
    encoder = coreml_audio_encoder(lm, precision=precision)
    _check_buckets(buckets, min_frames=encoder.min_frames)
    program = _AudioProgram(encoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".audio-encoder-") as tmp:
        descriptor = ct.utils.MultiFunctionDescriptor()
        for frames in sorted(buckets):
            features, mask = encoder.example_inputs(frames)
            path = Path(tmp) / f"{bucket_function_name(frames)}.mlpackage"
            compress(_convert(program, (features, mask.int()), inputs=AUDIO_INPUTS, outputs=AUDIO_OUTPUTS,
                              precision=precision)).save(str(path))
            descriptor.add_function(str(path), src_function_name="main",
                                    target_function_name=bucket_function_name(frames))
        descriptor.default_function_name = bucket_function_name(max(buckets))
        staged = Path(tmp) / out.name
        ct.utils.save_multifunction(descriptor, str(staged))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out


def _check_buckets(buckets: tuple[int, ...], *, min_frames: int) -> None:
    if not buckets:
        raise InputError("at least one audio bucket is needed")
    if len(set(buckets)) != len(buckets):
        raise InputError(f"audio buckets repeat: {buckets}")
    for frames in buckets:
        if frames % FRAME_MULTIPLE or not min_frames <= frames <= MAX_FRAMES:
            raise InputError(f"audio bucket {frames} frames: must be a multiple of {FRAME_MULTIPLE} "
                             f"between {min_frames} and {MAX_FRAMES}")
