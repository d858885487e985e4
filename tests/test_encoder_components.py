"""Per-component numerical tests against transformers: the vision and audio encoders.

Eager VisionEncoder / AudioEncoder vs Gemma4Model.get_image_features / get_audio_features
on the same random weights, fed by transformers' own preprocessing (image processor on
PIL images of several aspect ratios; feature extractor on synthetic speech-like audio of
odd lengths). Then the export proof: torch.export(strict=True) (what ExecuTorch lowers)
and torch.onnx.export(dynamo=True) run in onnxruntime, each exported once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgekit.export.components.audio_encoder import AudioEncoder
from edgekit.export.components.vision_encoder import QUERY_CHUNKED, VisionEncoder, bake_clipped_linears
from edgekit.checkpoint import load

Image = pytest.importorskip("PIL.Image")
ort = pytest.importorskip("onnxruntime")

ASPECTS = [(480, 640), (900, 300), (256, 1024)]  # landscape, tall, wide strip (h, w)
CLIP_SECONDS = [1.3, 4.7]  # odd lengths on purpose
ONNX_ATOL = 1e-4


# --- inputs: transformers' own preprocessing on synthetic media ------------------------
def _image(height: int, width: int, seed: int = 0) -> "Image.Image":
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, ((x + y) % 64) * 4], -1)
    rgb = rgb + rng.normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _image_inputs(budget: int, size: tuple[int, int]) -> dict:
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(max_soft_tokens=budget)(_image(*size), return_tensors="pt")


def _audio_inputs(seconds: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1375 * t) * np.sin(2 * np.pi * 3 * t)
    wave = (wave + 0.05 * rng.normal(size=t.shape)).astype(np.float32)
    feats = Gemma4AudioFeatureExtractor()([wave], return_tensors="pt")
    return feats["input_features"], feats["input_features_mask"]


def _pad_frames(features: torch.Tensor, mask: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the runner does: zero frames, False mask, up to `frames`."""
    extra = frames - features.shape[1]
    return F.pad(features, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def _runner_frames(encoder: AudioEncoder, frames: int) -> int:
    multiple = -(-frames // encoder.frame_multiple) * encoder.frame_multiple
    return max(encoder.min_frames, multiple)


@pytest.fixture(scope="module", params=["tiny_e2b", "tiny_e4b"])
def model(request):
    return load(request.getfixturevalue(request.param)).reference_model()


@pytest.fixture(scope="module")
def e2b(tiny_e2b):
    return load(tiny_e2b).reference_model()


# --- eager parity ------------------------------------------------------------------------
@pytest.mark.parametrize("budget,query_chunk", [(70, None), (280, None), (70, 64)])
def test_vision_matches_get_image_features(model, budget, query_chunk):
    """query_chunk=64: 630 patches in 9 whole blocks and one of 54 (ExecuTorch's path)."""
    encoder = VisionEncoder(model, max_soft_tokens=budget, query_chunk=query_chunk).eval()
    for size in ASPECTS:
        inputs = _image_inputs(budget, size)
        pixels, positions = inputs["pixel_values"], inputs["image_position_ids"]
        with torch.no_grad():
            reference = torch.cat(model.model.get_image_features(pixels, positions).pooler_output)
            tokens, valid = encoder(pixels, positions)
        count = int(inputs["num_soft_tokens_per_image"][0])
        assert tokens.shape == (1, budget, model.config.text_config.hidden_size)
        assert int(valid.sum()) == count == reference.shape[0], size
        assert bool(valid[0, :count].all()), "valid rows must be a prefix"
        assert count < budget and torch.count_nonzero(tokens[0, count:]) == 0
        torch.testing.assert_close(tokens[0, valid[0]], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seconds", CLIP_SECONDS)
def test_audio_matches_get_audio_features(model, seconds):
    encoder = AudioEncoder(model).eval()
    features, mask = _audio_inputs(seconds)
    with torch.no_grad():
        out = model.model.get_audio_features(features, mask)
        reference, ref_mask = out.pooler_output[0], out.attention_mask[0]
        tokens, token_mask = encoder(*_pad_frames(features, mask, _runner_frames(encoder, features.shape[1])))
    n = reference.shape[0]
    assert tokens.shape[1] == n  # frames padded to a multiple of 4: same token count
    assert torch.equal(token_mask[0], ref_mask)
    torch.testing.assert_close(tokens[0, token_mask[0]], reference[ref_mask], atol=1e-5, rtol=1e-5)


def test_audio_bucket_padding_and_int_mask_keep_valid_tokens(e2b):
    """A 10 s bucket (1000 frames, mask 0/1 ints) gives the same valid tokens as the clip alone."""
    encoder = AudioEncoder(e2b).eval()
    features, mask = _audio_inputs(1.3, seed=1)
    with torch.no_grad():
        out = e2b.model.get_audio_features(features, mask)
        padded, padded_mask = _pad_frames(features, mask, 1000)
        tokens, token_mask = encoder(padded, padded_mask.long())
    assert tokens.shape[1] == 250 and int(token_mask.sum()) == int(out.attention_mask.sum())
    torch.testing.assert_close(tokens[0, token_mask[0]], out.pooler_output[0, out.attention_mask[0]],
                               atol=1e-5, rtol=1e-5)


def test_query_chunking_leaves_the_loaded_model_alone(e2b):
    implementation = e2b.model.vision_tower.config._attn_implementation
    encoder = VisionEncoder(e2b, max_soft_tokens=70, query_chunk=64)
    chunked = encoder.layers[0].self_attn
    assert chunked.config._attn_implementation == QUERY_CHUNKED and chunked.query_chunk == 64
    assert e2b.model.vision_tower.config._attn_implementation == implementation != QUERY_CHUNKED
    assert e2b.model.vision_tower.encoder.layers[0].self_attn.config is e2b.model.vision_tower.config


def test_baked_clipped_linears_share_weights_and_leave_the_model_alone(e2b):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    layers = e2b.model.audio_tower.layers
    baked = bake_clipped_linears(layers)
    original = layers[0].self_attn.q_proj
    clone = baked[0].self_attn.q_proj
    assert isinstance(original, Gemma4ClippableLinear) and original.use_clipped_linears
    assert clone.linear.weight is original.linear.weight
    assert clone.in_bounds == (float(original.input_min), float(original.input_max))
    x = torch.randn(3, original.linear.in_features) * 50  # far past the +-8 bounds
    with torch.no_grad():
        assert torch.equal(clone(x), original(x))


# --- export: torch.export (strict, for ExecuTorch) and ONNX (dynamo) -----------------------
@pytest.fixture(scope="module")
def vision_export(e2b, tmp_path_factory):
    encoder = VisionEncoder(e2b, max_soft_tokens=70).eval()
    program = torch.export.export(encoder, encoder.example_inputs(), strict=True)
    path = tmp_path_factory.mktemp("onnx") / "vision_encoder.onnx"
    torch.onnx.export(program, dynamo=True, input_names=["pixel_values", "pixel_position_ids"],
                      output_names=["soft_tokens", "valid_mask"]).save(path)
    return encoder, program, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def audio_export(e2b, tmp_path_factory):
    encoder = AudioEncoder(e2b).eval()
    program = torch.export.export(encoder, encoder.example_inputs(200), strict=True,
                                  dynamic_shapes=encoder.dynamic_shapes())
    path = tmp_path_factory.mktemp("onnx") / "audio_encoder.onnx"
    torch.onnx.export(program, dynamo=True, input_names=["input_features", "input_features_mask"],
                      output_names=["audio_soft_tokens", "token_mask"]).save(path)
    return encoder, program, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_vision(encoder, run) -> None:
    for size in ASPECTS[:2]:
        inputs = _image_inputs(70, size)
        pixels, positions = inputs["pixel_values"], inputs["image_position_ids"]
        with torch.no_grad():
            want_tokens, want_valid = encoder(pixels, positions)
        tokens, valid = run(pixels, positions)
        assert np.array_equal(np.asarray(valid), want_valid.numpy())
        assert np.abs(np.asarray(tokens) - want_tokens.numpy()).max() < ONNX_ATOL


def _audio_cases(encoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cases = []
    for seconds in CLIP_SECONDS:  # two lengths through one graph
        features, mask = _audio_inputs(seconds)
        cases.append(_pad_frames(features, mask, _runner_frames(encoder, features.shape[1])))
    cases.append(_pad_frames(*_audio_inputs(0.2), encoder.min_frames))  # shortest graph input
    return cases


def _check_audio(encoder, run) -> None:
    for features, mask in _audio_cases(encoder):
        with torch.no_grad():
            want_tokens, want_mask = encoder(features, mask)
        tokens, token_mask = run(features, mask)
        assert np.asarray(tokens).shape == tuple(want_tokens.shape)
        assert np.array_equal(np.asarray(token_mask), want_mask.numpy())
        assert np.abs(np.asarray(tokens) - want_tokens.numpy()).max() < ONNX_ATOL


def test_vision_strict_export_matches_eager(vision_export):
    encoder, program, _ = vision_export
    with torch.no_grad():
        _check_vision(encoder, lambda *a: [t.numpy() for t in program.module()(*a)])


def test_vision_onnx_matches_eager(vision_export):
    encoder, _, session = vision_export
    _check_vision(encoder, lambda p, q: session.run(None, {"pixel_values": p.numpy(), "pixel_position_ids": q.numpy()}))


def test_audio_strict_export_is_dynamic_and_matches_eager(audio_export):
    encoder, program, _ = audio_export
    frames = program.graph_signature.user_inputs[0]
    shape = next(n for n in program.graph.nodes if n.name == frames).meta["val"].shape
    assert not isinstance(shape[1], int), "frame count must stay symbolic"
    with torch.no_grad():
        _check_audio(encoder, lambda *a: [t.numpy() for t in program.module()(*a)])


def test_audio_onnx_is_dynamic_and_matches_eager(audio_export):
    encoder, _, session = audio_export
    assert isinstance(session.get_inputs()[0].shape[1], str)  # a named dynamic axis
    _check_audio(encoder, lambda f, m: session.run(
        None, {"input_features": f.numpy(), "input_features_mask": m.numpy()}))


def test_query_chunked_vision_lowers_to_executorch_with_small_activation_memory(e2b, tmp_path):
    """The ExecuTorch path: 630 patches in blocks of 64 through XNNPACK match the unchunked
    encoder, and memory planning reserves less than one whole [heads, P, P] score tensor
    (sdpa's safe softmax left several of those outside the delegate)."""
    from executorch.runtime import Runtime

    from edgekit.export.executorch.lower import lower_to_pte

    chunked = VisionEncoder(e2b, max_soft_tokens=70, query_chunk=64).eval()
    reference = VisionEncoder(e2b, max_soft_tokens=70).eval()
    with torch.no_grad():
        program = torch.export.export(chunked, chunked.example_inputs(), strict=True)
    out = tmp_path / "vision.pte"
    lowered = lower_to_pte({"vision_encoder": program}, constant_methods={}, out=out)
    heads, patches = e2b.config.vision_config.num_attention_heads, chunked.max_patches
    assert 0 < lowered["vision_encoder"].planned_bytes < heads * patches * patches * 4
    method = Runtime.get().load_program(out).load_method("vision_encoder")
    for size in ASPECTS[:2]:
        inputs = _image_inputs(70, size)
        pixels = F.pad(inputs["pixel_values"], (0, 0, 0, patches - inputs["pixel_values"].shape[1]))
        positions = F.pad(inputs["image_position_ids"], (0, 0, 0, patches - inputs["image_position_ids"].shape[1]),
                          value=-1)
        tokens, valid = method.execute([pixels, positions])
        with torch.no_grad():
            want_tokens, want_valid = reference(pixels, positions)
        assert torch.equal(valid, want_valid) and int(valid.sum()) == int(inputs["num_soft_tokens_per_image"][0])
        # XNNPACK's fp32 kernels: ~2e-4 of the largest value, chunked or not (measured)
        assert float((tokens - want_tokens).abs().max() / want_tokens.abs().max()) < 1e-3
