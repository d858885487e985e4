"""Core ML encoders: structure tests of the converted tiny-e2b programs, and torch-side parity
of what the conversion changes (CPU; skipped where coremltools is missing).

- The vision program and the audio multifunction package of an exported bundle (the suite's
  background Core ML export): inputs, outputs, shapes, dtypes and function names read back.
- What the conversion changes is checked in torch, on the modules that are traced: a clip
  padded up to a bucket (fp16-safe constants) and an image padded to the budget (fused
  attention, int32 positions) give transformers' valid soft tokens.
- The op converters (torch_ops.py) are checked by the types they give.
Numerics of the saved programs: tests/test_coreml_export.py (verify against transformers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgekit.checkpoint import load
from edgekit.errors import InputError
from edgekit.export.components.audio_encoder import MAX_FRAMES

ct = pytest.importorskip("coremltools")

from edgekit.export.coreml import encoders, torch_ops  # noqa: E402
from edgekit.export.coreml.encoders import (  # noqa: E402
    AUDIO_INPUTS, AUDIO_OUTPUTS, VISION_INPUTS, VISION_OUTPUTS, audio_buckets, bucket_function_name,
    coreml_audio_encoder, convert_audio_encoder, pick_bucket)

VISION_BUDGET = 70
AUDIO_BUCKETS = (200, 400)  # a clip padded to either gives the same tokens


@pytest.fixture(scope="module")
def e2b(tiny_e2b):
    return load(tiny_e2b).reference_model()


def _io(spec_description) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) of a model or function description's inputs and outputs."""
    names = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    return {feature.name: (tuple(feature.type.multiArrayType.shape), names(feature.type.multiArrayType.dataType))
            for feature in [*spec_description.input, *spec_description.output]}


# --- buckets -----------------------------------------------------------------------------
def test_default_buckets_double_up_to_thirty_seconds():
    buckets = audio_buckets(min_frames=52)
    assert buckets == (200, 400, 800, 1600, 3000) and buckets[-1] == MAX_FRAMES
    assert all(b % 4 == 0 for b in buckets)
    assert all(later <= 2 * earlier for earlier, later in zip(buckets, buckets[1:]))


def test_bucket_choice_rounds_to_whole_tokens_and_respects_min_frames():
    assert audio_buckets(1000, min_frames=52, shortest=30, growth=3) == (52, 156, 468, 1000)
    assert audio_buckets(600, min_frames=52, shortest=250, growth=1.5) == (252, 380, 572, 600)
    with pytest.raises(InputError, match="growth"):
        audio_buckets(min_frames=52, growth=1)
    with pytest.raises(InputError, match="multiple of 4"):
        audio_buckets(1001, min_frames=52)


def test_pick_bucket_is_the_smallest_that_holds_the_clip():
    buckets = (200, 400, 3000)
    assert [pick_bucket(n, buckets) for n in (4, 200, 204, 3000)] == [200, 200, 400, 3000]
    with pytest.raises(InputError, match="largest audio bucket"):
        pick_bucket(3004, buckets)


def test_bad_buckets_are_refused_before_conversion(e2b, tmp_path):
    for buckets in [(), (200, 200), (202,), (48,), (3004,)]:
        with pytest.raises(InputError):
            convert_audio_encoder(e2b, buckets=buckets, out=tmp_path / "audio.mlpackage")
    with pytest.raises(InputError, match="mlpackage"):
        convert_audio_encoder(e2b, buckets=(200,), out=tmp_path / "audio.bin")


# --- torch side: what the traced audio module changes ----------------------------------------
@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_bucket_padding_keeps_transformers_valid_tokens(e2b, precision):
    """A 1.3 s clip (130 frames, not a whole token) padded to each bucket, through the module
    that is traced, gives transformers' tokens for the clip alone; padded rows stay finite
    (with transformers' -1e9 fill, fp16's -inf would make them NaN)."""
    torch.manual_seed(0)
    features, mask = torch.randn(1, 130, 128), torch.ones(1, 130, dtype=torch.bool)
    encoder = coreml_audio_encoder(e2b, precision=precision)
    with torch.no_grad():
        out = e2b.model.get_audio_features(features, mask)
        reference = out.pooler_output[0, out.attention_mask[0]]
        for bucket in AUDIO_BUCKETS:
            padded = F.pad(features, (0, 0, 0, bucket - 130)), F.pad(mask, (0, bucket - 130)).int()
            tokens, token_mask = encoders._AudioProgram(encoder)(*padded)
            assert tokens.shape == (1, bucket // 4, e2b.config.text_config.hidden_size)
            assert token_mask.dtype == torch.int32 and int(token_mask.sum()) == math.ceil(130 / 4) == len(reference)
            assert bool(token_mask[0, :len(reference)].all()), "valid tokens must be a prefix"
            assert bool(torch.isfinite(tokens).all())
            torch.testing.assert_close(tokens[0, token_mask[0].bool()], reference, atol=1e-5, rtol=1e-5)


def _image_inputs(budget: int, height: int, width: int) -> dict:
    from PIL import Image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Gemma4ImageProcessorPil(max_soft_tokens=budget)(image, return_tensors="pt")


@pytest.mark.parametrize("size", [(480, 640), (16, 2000)])  # landscape; a strip one patch high
def test_fused_attention_vision_matches_get_image_features(e2b, size):
    """The traced vision module (fused-sdpa attention, int32 positions) on the processor's
    patches padded to the budget with positions (-1, -1), vs transformers."""
    inputs = _image_inputs(VISION_BUDGET, *size)
    pixels, positions = inputs["pixel_values"], inputs["image_position_ids"]
    program = encoders._VisionProgram(encoders.coreml_vision_encoder(e2b, budget=VISION_BUDGET))
    extra = program.encoder.max_patches - pixels.shape[1]
    padded = F.pad(pixels, (0, 0, 0, extra)), F.pad(positions, (0, 0, 0, extra), value=-1).int()
    with torch.no_grad():
        reference = torch.cat(e2b.model.get_image_features(pixels, positions).pooler_output)
        tokens, valid = program(*padded)
    count = int(inputs["num_soft_tokens_per_image"][0])
    assert valid.dtype == torch.int32 and int(valid.sum()) == count == len(reference)
    torch.testing.assert_close(tokens[0, :count], reference, atol=1e-5, rtol=1e-5)
    assert e2b.model.vision_tower.config._attn_implementation != encoders.FUSED_SDPA


def test_coreml_audio_encoder_leaves_the_loaded_model_alone(e2b):
    attention = e2b.model.audio_tower.layers[0].self_attn
    feed_forward = e2b.model.audio_tower.layers[0].feed_forward1
    encoder = coreml_audio_encoder(e2b, precision="float16")
    assert encoder.layers[0].self_attn.config.attention_invalid_logits_value == encoders.AUDIO_MASKED_LOGIT
    assert encoder.layers[0].feed_forward1.gradient_clipping == float(torch.finfo(torch.float16).max)
    assert attention.config.attention_invalid_logits_value == -1e9
    assert feed_forward.gradient_clipping == e2b.config.audio_config.gradient_clipping == 1e10
    assert encoder.layers[0].self_attn.q_proj.linear.weight is attention.q_proj.linear.weight


# --- converted programs, read back from an exported bundle ------------------------------------
# tests/conftest.py coreml_bundles: tiny-e2b through `edgekit export --device iphone-15-pro`
# (vision budget 280, the default audio buckets), converted once for the whole suite.

def test_vision_program_io(e2b, coreml_bundles):
    bundle, _ = coreml_bundles["e2b"]
    spec = ct.utils.load_spec(str(bundle.path / "vision_encoder.mlpackage"))
    vision = e2b.config.vision_config
    budget = bundle.manifest.image_preprocessing.max_soft_tokens
    patches = budget * vision.pooling_kernel_size**2
    hidden = e2b.config.text_config.hidden_size
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15
    assert _io(spec.description) == {
        VISION_INPUTS[0]: ((1, patches, 3 * vision.patch_size**2), "FLOAT32"),
        VISION_INPUTS[1]: ((1, patches, 2), "INT32"),
        VISION_OUTPUTS[0]: ((1, budget, hidden), "FLOAT32"),
        VISION_OUTPUTS[1]: ((1, budget), "INT32"),
    }
    assert [f.name for f in spec.description.input] == list(VISION_INPUTS)
    assert [f.name for f in spec.description.output] == list(VISION_OUTPUTS)
    ops = {op.type for block in spec.mlProgram.functions["main"].block_specializations.values()
           for op in block.operations}
    assert "scaled_dot_product_attention" in ops and "softmax" not in ops  # Core ML's fused attention


def _weight_bytes(package) -> int:
    return sum(p.stat().st_size for p in package.rglob("weight.bin"))


def test_audio_package_has_one_function_per_bucket_sharing_weights(e2b, coreml_bundles):
    bundle, _ = coreml_bundles["e2b"]
    package = bundle.path / "audio_encoder.mlpackage"
    spec = ct.utils.load_spec(str(package))
    hidden = e2b.config.text_config.hidden_size
    buckets = audio_buckets(min_frames=coreml_audio_encoder(e2b, precision="float16").min_frames)
    functions = {f.name: f for f in spec.description.functions}
    assert list(functions) == [bucket_function_name(b) for b in buckets]
    assert spec.description.defaultFunctionName == bucket_function_name(MAX_FRAMES)
    assert set(spec.mlProgram.functions) == set(functions)
    assert bundle.manifest.method("audio_encoder").extra["functions"] == {bucket_function_name(b): b for b in buckets}
    for frames in buckets:
        function = functions[bucket_function_name(frames)]
        assert _io(function) == {
            AUDIO_INPUTS[0]: ((1, frames, 128), "FLOAT32"),
            AUDIO_INPUTS[1]: ((1, frames), "INT32"),
            AUDIO_OUTPUTS[0]: ((1, frames // 4, hidden), "FLOAT32"),
            AUDIO_OUTPUTS[1]: ((1, frames // 4), "INT32"),
        }
    # At most one fp16 copy of the tower's weights, not one per function.
    one_copy = 2 * sum(p.numel() for m in (e2b.model.audio_tower, e2b.model.embed_audio) for p in m.parameters())
    assert _weight_bytes(package) < 1.25 * one_copy
    assert not any(".audio-encoder-" in f.path for f in bundle.manifest.files)  # no staging folder left


# --- the op converters, by the types they give ------------------------------------------------
class _MaskWindows(torch.nn.Module):
    """The blocked key mask's ops: pad a bool mask, unfold it, `&` and `|` with bool windows,
    movedim a float tensor the way transformers' _extract_block_context does."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = F.pad(mask.bool(), (2, 3)).unfold(1, 6, 4)  # [1, 4, 6]
        steps = torch.arange(6)
        window = (steps < 2) | (steps > 4)
        blocks = torch.movedim(F.pad(x, (0, 0, 2, 3)).unfold(1, 6, 4), -1, 2)  # [1, 4, 6, 3]
        return blocks, (keys & window).int()


def test_op_converters_give_torch_shapes_and_dtypes():
    x, mask = torch.randn(1, 16, 3), torch.ones(1, 16, dtype=torch.int32)
    traced = torch.jit.trace(_MaskWindows(), (x, mask))
    torch_ops.register_torch_ops()
    model = ct.convert(traced, inputs=[ct.TensorType("x", shape=x.shape, dtype=np.float32),
                                       ct.TensorType("mask", shape=mask.shape, dtype=np.int32)],
                       outputs=[ct.TensorType("blocks", dtype=np.float32), ct.TensorType("keys", dtype=np.int32)],
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    want_blocks, want_keys = _MaskWindows()(x, mask)
    assert _io(model.get_spec().description) == {
        "x": ((1, 16, 3), "FLOAT32"), "mask": ((1, 16), "INT32"),
        "blocks": (tuple(want_blocks.shape), "FLOAT32"), "keys": (tuple(want_keys.shape), "INT32")}
    ops = [op.op_type for op in model._mil_program.functions["main"].operations]
    assert ops.count("sliding_windows") == 2 and "logical_and" in ops


class _PositionCells(torch.nn.Module):
    """The vision pooler's position arithmetic: clamp padding (-1) to 0, floor-divide by k."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.div(positions.clamp(min=0), 3, rounding_mode="floor")


def test_int_clamp_and_floor_division_stay_int32_in_a_float16_program():
    """In fp16, positions past 2048 are not exact (3359 reads 3360); they must not pass through it."""
    positions = torch.tensor([[-1, 0, 2047, 3359]], dtype=torch.int32)
    torch_ops.register_torch_ops()
    model = ct.convert(torch.jit.trace(_PositionCells(), (positions,)),
                       inputs=[ct.TensorType("positions", shape=positions.shape, dtype=np.int32)],
                       outputs=[ct.TensorType("cells", dtype=np.int32)], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16)
    ops = [op for op in model._mil_program.functions["main"].operations if op.op_type != "const"]
    assert [op.op_type for op in ops] == ["maximum", "floor_div"]
    assert all(op.outputs[0].dtype == ct.converters.mil.mil.types.int32 for op in ops)


def test_registering_twice_keeps_one_wrapper():
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    torch_ops.register_torch_ops()
    pad = _TORCH_OPS_REGISTRY.get_func("pad")
    torch_ops.register_torch_ops()
    assert _TORCH_OPS_REGISTRY.get_func("pad") is pad and pad.edgekit_wraps is not pad
    assert _TORCH_OPS_REGISTRY.get_func("unfold") is torch_ops.unfold
    assert all(_TORCH_OPS_REGISTRY.get_func(name).edgekit_wraps for name in torch_ops.WRAPPED)
