"""The `audio_preprocessor` method: waveform -> log-mel frames, eager and as a .pte.

Tiers: CPU unit tests of the eager module (export/components/audio_preprocessor.py)
against edgekit.runtimes.mel_features.log_mel_features and transformers'
Gemma4AudioFeatureExtractor, Gemma 4's settings and the branches they leave off; the
method build from a checkpoint's processor config; then one small .pte (this method alone,
lowered to XNNPACK) run through executorch.runtime at several lengths with one program.
About 25 s, half of it lowering.

Tolerance: the module takes the DFT as an fp32 product over frame_length+1 samples, the
reference a float32 FFT and a float64 mel product. Rounding error in the product grows
with the frame's energy, so it shows in the quiet mel bins of loud frames (log of a
small number). Measured (x86 CPU, torch 2.13 / executorch 1.5.1) on 0.024..30 s clips:
max |diff| 2.3e-4 eager and 1.2e-4 in the .pte at Gemma 4's settings, 3.2e-4 eager with
other frame/hop sizes, 5.2e-4 with a 1e-5 mel floor; mean |diff| under 1e-6 everywhere.
Values against transformers are the same to 1e-6. Masks are identical.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.errors import ExportError
from edgekit.export.components.audio_preprocessor import LogMelSpectrogram
from edgekit.export.verify import test_audio as verification_audio
from edgekit.manifest import METHOD_AUDIO_PREPROCESSOR
from edgekit.runtimes.mel_features import MAX_SAMPLES, PAD_TO_MULTIPLE_OF, MelParams, log_mel_features, num_mel_frames

RATE = 16_000
MAX_ABS = 5e-4  # log-mel (measured <= 2.3e-4 at Gemma 4's settings, 3.2e-4 at others)
MEAN_ABS = 2e-6  # (measured <= 9e-7)

# 0.3 s, 1.7 s, an odd count, the 384-sample minimum of the graph, 30 s.
LENGTHS = (4_800, 27_200, 27_201, 384, MAX_SAMPLES)


def _clip(num_samples: int) -> np.ndarray:
    """edgekit's verification signal (tones under a 3 Hz envelope, noise), cut to length."""
    return verification_audio(num_samples / RATE + 0.01, RATE)[:num_samples]


def _padded(x: np.ndarray, multiple: int = PAD_TO_MULTIPLE_OF) -> tuple[torch.Tensor, torch.Tensor]:
    """What a runner passes: the clip zero-padded to a multiple of 128, and its real length."""
    total = -(-len(x) // multiple) * multiple
    return torch.from_numpy(np.pad(x, (0, total - len(x)))), torch.tensor([len(x)], dtype=torch.long)


def _eager(module: LogMelSpectrogram, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        features, mask = module(*_padded(x))
    assert features.dtype == torch.float32 and mask.dtype == torch.bool
    return features[0].numpy(), mask[0].numpy()


def _assert_close(features: np.ndarray, mask: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray, *,
                  max_abs: float = MAX_ABS, what: str = "") -> float:
    assert features.shape == ref.shape, what
    np.testing.assert_array_equal(mask, ref_mask, err_msg=what)
    diff = np.abs(features - ref)
    assert float(diff.max(initial=0.0)) <= max_abs, f"{what}: max |diff| {diff.max():.3g} > {max_abs:g}"
    assert not diff.size or float(diff.mean()) <= MEAN_ABS, f"{what}: mean |diff| {diff.mean():.3g}"
    assert (features[~mask] == 0).all(), what
    return float(diff.max(initial=0.0))


@pytest.fixture(scope="module")
def gemma4() -> LogMelSpectrogram:
    return LogMelSpectrogram(MelParams()).eval()


# --- eager module vs the references --------------------------------------------------------


@pytest.mark.parametrize("num_samples", LENGTHS)
def test_eager_matches_numpy_and_transformers(gemma4: LogMelSpectrogram, num_samples: int) -> None:
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    x = _clip(num_samples)
    features, mask = _eager(gemma4, x)
    ref, ref_mask = log_mel_features(x, params=MelParams())
    _assert_close(features, mask, ref, ref_mask, what="vs log_mel_features")
    hf = Gemma4AudioFeatureExtractor()([x], return_tensors="np")
    _assert_close(features, mask, hf["input_features"][0], hf["input_features_mask"][0], what="vs transformers")
    assert mask.sum() == num_mel_frames(num_samples, params=MelParams())  # a prefix: the clip's own frames


@pytest.mark.parametrize("num_samples", [0, 100, 255, 256, 321])
def test_eager_short_clips_have_the_reference_frame_count(gemma4: LogMelSpectrogram, num_samples: int) -> None:
    """Under one frame there are none; the graph needs 384 samples, eager does not."""
    x = _clip(num_samples)
    features, mask = _eager(gemma4, x)
    ref, ref_mask = log_mel_features(x, params=MelParams())
    _assert_close(features, mask, ref, ref_mask, what=str(num_samples))


def test_padding_past_the_clip_only_appends_masked_frames(gemma4: LogMelSpectrogram) -> None:
    x = _clip(27_201)
    features, mask = _eager(gemma4, x)
    with torch.no_grad():
        bucket, bucket_mask = gemma4(*_padded(x, multiple=16_000))
    bucket, bucket_mask = bucket[0].numpy(), bucket_mask[0].numpy()
    assert len(bucket) > len(features) and not bucket_mask[len(features):].any()
    np.testing.assert_array_equal(bucket[: len(features)], features)
    np.testing.assert_array_equal(bucket_mask[: len(features)], mask)
    assert (bucket[len(features):] == 0).all()


@pytest.mark.parametrize("settings, max_abs", [
    ({"preemphasis": 0.97}, MAX_ABS),
    ({"preemphasis": 0.97, "preemphasis_htk_flavor": False, "fft_overdrive": True}, MAX_ABS),
    # A 100x lower floor lets the log see 100x smaller (less accurate) mel energies: 5.2e-4 measured.
    ({"per_bin_mean": np.linspace(-2, 1, 128).tolist(), "per_bin_stddev": np.linspace(0.5, 3, 128).tolist(),
      "input_scale_factor": 2.0, "mel_floor": 1e-5}, 1e-3),
    ({"frame_length_ms": 25.0, "feature_size": 80, "min_frequency": 125.0, "max_frequency": 7600.0}, MAX_ABS),
    ({"frame_length_ms": 32.0, "hop_length_ms": 12.5}, MAX_ABS),
], ids=["preemphasis-htk", "preemphasis-overdrive", "per-bin-norm-scale-floor", "25ms-80bins", "32ms-hop200"])
def test_eager_other_settings_match_numpy(settings: dict, max_abs: float) -> None:
    """Branches Gemma 4's config leaves off (log_mel_features matches transformers on them:
    tests/test_preprocessing.py)."""
    params = MelParams(**settings)
    module = LogMelSpectrogram(params).eval()
    for num_samples in (17_600, MAX_SAMPLES):
        x = _clip(num_samples)
        ref, ref_mask = log_mel_features(x, params=params)
        _assert_close(*_eager(module, x), ref, ref_mask, max_abs=max_abs, what=f"{settings} {num_samples}")


def test_dither_is_refused() -> None:
    with pytest.raises(ExportError, match="dither"):
        LogMelSpectrogram(MelParams(dither=1e-5))


# --- the method build ------------------------------------------------------------------------


def test_build_reads_the_checkpoints_processor_config(tmp_path: Path) -> None:
    """Settings come from processor_config.json as the manifest's audio_preprocessing does
    (written here by the same code as for the tiny checkpoints; no weights needed)."""
    from edgekit.export.executorch.methods import audio_preprocessor
    from edgekit.checkpoint import Checkpoint
    from edgekit.models.gemma4.processor_files import PROCESSOR_CONFIG, processor_config

    def checkpoint(**feature_extractor) -> Checkpoint:
        config = processor_config({})
        config["feature_extractor"].update(feature_extractor)
        (tmp_path / PROCESSOR_CONFIG).write_text(json.dumps(config))
        return Checkpoint(path=tmp_path, config={"model_type": "gemma4"}, headers=[])

    build = audio_preprocessor(checkpoint())
    assert build.name == METHOD_AUDIO_PREPROCESSOR
    assert build.module.params == MelParams()  # transformers' defaults
    assert [(s.name, s.dtype) for s in build.inputs] == [("waveform", "float32"), ("num_samples", "int64")]
    assert [(s.name, s.dtype) for s in build.outputs] == [("input_features", "float32"),
                                                          ("input_features_mask", "bool")]
    assert build.outputs[0].shape[2] == 128 and build.inputs[0].is_dynamic
    assert build.hints["pad_to_multiple_of"] == 128 and build.hints["max_samples"] == 480_000
    assert build.hints["min_samples"] == build.module.min_samples == 384
    json.dumps(build.hints)  # manifest-ready

    custom = audio_preprocessor(checkpoint(preemphasis=0.97, hop_length_ms=12.5, hop_length=200))
    assert custom.module.params == dataclasses.replace(MelParams(), preemphasis=0.97, hop_length_ms=12.5)


# --- the .pte --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """One program with only audio_preprocessor, lowered as the exporter lowers every method."""
    runtime = pytest.importorskip("executorch.runtime")
    from edgekit.export.executorch.lower import export_method, lower_to_pte
    from edgekit.export.executorch.methods import audio_preprocessor

    build = audio_preprocessor(MelParams())
    out = tmp_path_factory.mktemp("pte") / "audio_preprocessor.pte"
    lowered = lower_to_pte({build.name: export_method(build)}, constant_methods={}, out=out)
    assert lowered[build.name].delegates.get("XnnpackBackend", 0) >= 1  # the DFT and mel products run in XNNPACK
    return runtime.Runtime.get().load_program(str(out))


def test_pte_matches_reference_at_any_length(program) -> None:
    """One program, several lengths (dynamic N), the same values and masks as the reference."""
    method = program.load_method(METHOD_AUDIO_PREPROCESSOR)
    for num_samples in LENGTHS:
        x = _clip(num_samples)
        features, mask = method.execute(list(_padded(x)))
        assert tuple(features.shape[:2]) == tuple(mask.shape) and mask.dtype == torch.bool
        ref, ref_mask = log_mel_features(x, params=MelParams())
        _assert_close(features[0].numpy(), mask[0].numpy(), ref, ref_mask, what=f".pte {num_samples}")


def test_pte_refuses_more_than_30_seconds(program) -> None:
    """The runtime checks the upper bound (memory is planned for it). It does not check
    min_samples: shorter inputs happened to run right with executorch 1.5.1, but only
    lengths in [min_samples, max_samples] are exported, so the runner pads to min_samples."""
    method = program.load_method(METHOD_AUDIO_PREPROCESSOR)
    waveform = torch.zeros(MAX_SAMPLES + PAD_TO_MULTIPLE_OF)
    with pytest.raises(RuntimeError):
        method.execute([waveform, torch.tensor([MAX_SAMPLES], dtype=torch.long)])
