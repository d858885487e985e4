"""CPU unit tests + parity against transformers' processors.

Device-side preprocessing (edgekit.runtimes.mel_features, image_preprocess, wav_io) is
checked against the Gemma4Processor of a tiny random-weight checkpoint: log-mel features
and masks, audio soft-token counts, pixel patches, position ids and image soft-token
counts. WAV reading, resampling and the one-line errors for bad inputs are plain unit
tests; a subprocess proves the three modules import and run with torch and transformers
unimportable. Fast (well under 30 s, most of it the checkpoint fixture).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.errors import InputError
from edgekit.runtimes.image_preprocess import SUPPORTED_SOFT_TOKENS, ImageParams, num_soft_tokens, preprocess_image
from edgekit.runtimes.mel_features import MelParams, log_mel_features, num_audio_tokens
from edgekit.runtimes.wav_io import load_audio, read_wav, resample, to_mono, wav_info

ROOT = Path(__file__).resolve().parent.parent
RATE = 16_000


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor_config(tiny_e2b: Path) -> dict:
    return json.loads((tiny_e2b / "processor_config.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_e2b: Path):
    """transformers' Gemma4Processor for the tiny checkpoint (PIL image backend)."""
    from edgekit.models.gemma4.processor_files import load_reference_processor

    return load_reference_processor(tiny_e2b)


@pytest.fixture(scope="module")
def mel_params(processor_config: dict) -> MelParams:
    return MelParams.from_dict(processor_config["feature_extractor"])


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp, a steady tone, noise and a quiet gap: every mel bin sees some energy."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE))
    t = np.arange(n) / RATE
    x = 0.3 * np.sin(2 * np.pi * (100 + 3000 * t / max(seconds, 1e-3)) * t) + 0.1 * np.sin(2 * np.pi * 440 * t)
    x += 0.05 * rng.standard_normal(n)
    x[n // 3 : n // 3 + n // 10] = 0.0  # hard zeros: the log floor path
    return x.astype(np.float32)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, repr(message)
    return message


# --- log-mel features ---------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.5, 1.3, 7.0])
def test_log_mel_matches_processor(reference, mel_params: MelParams, seconds: float) -> None:
    x = _speech_like(seconds)
    ref = reference(text=[reference.audio_token], audio=[x], return_tensors="np")
    features, mask = log_mel_features(x, params=mel_params)

    assert features.dtype == np.float32 and mask.dtype == np.bool_
    assert features.shape == ref["input_features"][0].shape == (mask.shape[0], 128)
    np.testing.assert_array_equal(mask, ref["input_features_mask"][0])
    assert float(np.max(np.abs(features - ref["input_features"][0]))) < 1e-4
    assert not mask[-1] or len(x) % 128 == 0  # the last frame reaches into the 128-sample padding
    assert (features[~mask] == 0).all()


@pytest.mark.parametrize("num_samples", [0, 100, 321, 481, 8001])
def test_log_mel_short_clips_match(mel_params: MelParams, num_samples: int) -> None:
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    x = _speech_like(num_samples / RATE, seed=1)
    ref = Gemma4AudioFeatureExtractor()([x], return_tensors="np")
    features, mask = log_mel_features(x, params=mel_params)
    assert features.shape == ref["input_features"][0].shape
    np.testing.assert_array_equal(mask, ref["input_features_mask"][0])
    np.testing.assert_allclose(features, ref["input_features"][0], atol=1e-4, rtol=0)


def test_log_mel_other_settings_match() -> None:
    """Branches Gemma 4's defaults leave off: preemphasis (both flavours), per-bin
    normalisation, FFT overdrive, input scaling, another frame size and band."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    x = _speech_like(1.1, seed=2)
    settings = [
        {"preemphasis": 0.97},
        {"preemphasis": 0.97, "preemphasis_htk_flavor": False, "fft_overdrive": True},
        {"per_bin_mean": np.linspace(-2, 1, 128).tolist(), "per_bin_stddev": np.linspace(0.5, 3, 128).tolist(),
         "input_scale_factor": 2.0, "mel_floor": 1e-5},
        {"frame_length_ms": 25.0, "feature_size": 80, "min_frequency": 125.0, "max_frequency": 7600.0},
    ]
    for kwargs in settings:
        extractor = Gemma4AudioFeatureExtractor(**kwargs)
        ref = extractor([x], return_tensors="np")
        params = MelParams.from_dict({**extractor.to_dict(), **kwargs})
        features, mask = log_mel_features(x, params=params)
        np.testing.assert_array_equal(mask, ref["input_features_mask"][0])
        np.testing.assert_allclose(features, ref["input_features"][0], atol=1e-4, rtol=0, err_msg=str(kwargs))


def test_mel_params_from_dict(processor_config: dict) -> None:
    section = processor_config["feature_extractor"]
    params = MelParams.from_dict({**section, "unknown_future_key": 1})
    assert (params.frame_length, params.hop_length, params.fft_length) == (320, 160, 512)
    assert params == MelParams()  # the checkpoint holds transformers' defaults
    # Saved sample counts that disagree with the *_ms fields are an error, not ignored.
    with pytest.raises(InputError) as exc:
        MelParams.from_dict({**section, "frame_length": 400})
    assert "frame_length=400" in _one_line(exc)
    with pytest.raises(InputError):
        MelParams.from_dict({"per_bin_mean": [0.0] * 3})


def test_log_mel_rejects_bad_waveforms(mel_params: MelParams) -> None:
    with pytest.raises(InputError) as exc:
        log_mel_features(np.zeros((100, 2), np.float32), params=mel_params)
    assert "mono" in _one_line(exc)
    with pytest.raises(InputError) as exc:
        log_mel_features(np.zeros(31 * RATE, np.float32), params=mel_params)
    assert "at most 30 s" in _one_line(exc)


def test_num_audio_tokens_matches_processor(reference, mel_params: MelParams) -> None:
    for n in [0, 160, 161, 320, 481, 640, 8000, 20800, 16_000 * 7 + 37, 479_999, 480_000, 16_000 * 31]:
        expected = reference._compute_audio_num_tokens(np.zeros(n), RATE)
        assert num_audio_tokens(n, params=mel_params) == expected, n
    # ... and the placeholders the processor puts in the prompt (from the mask).
    for seconds in [0.5, 1.3, 7.0]:
        x = _speech_like(seconds)
        ids = reference(text=[reference.audio_token], audio=[x], return_tensors="np")["input_ids"]
        assert num_audio_tokens(len(x), params=mel_params) == int((ids == reference.audio_token_id).sum())
    assert num_audio_tokens(30 * RATE) == 750  # 40 ms per token, capped at 30 s


# --- images -------------------------------------------------------------------------------


def _picture(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """Gradients plus noise, so bicubic resizing has edges and texture to get wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1),
                     127 + 127 * np.sin(xx / 7.0 + yy / 11.0)], axis=-1)
    rgb = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(rgb[..., 0])
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=-1))
    return Image.fromarray(rgb)


IMAGES = [(640, 480, "RGB"), (300, 1200, "RGB"), (1500, 200, "RGB"), (17, 900, "RGB"),
          (333, 251, "L"), (250, 180, "RGBA")]  # (width, height, mode); L and RGBA also go through PNG files


@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_image_matches_processor(reference, processor_config: dict, tmp_path: Path, budget: int) -> None:
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    section = {**processor_config["image_processor"], "max_soft_tokens": budget}
    ref = Gemma4ImageProcessorPil(**{k: v for k, v in section.items() if k != "image_processor_type"})
    params = ImageParams.from_dict(section)
    for seed, (width, height, mode) in enumerate(IMAGES):
        image = _picture(width, height, mode, seed)
        path = tmp_path / f"{width}x{height}-{mode}.png"
        image.save(path)
        # A PIL image (transparency composited onto white) and a path (transformers'
        # load_image: convert("RGB")) take different routes in the reference; check both.
        for source, ref_source in [(image, image), (path, str(path))]:
            expected = ref(ref_source, return_tensors="np")
            pixel_values, position_ids, n = preprocess_image(source, params=params)
            case = f"{width}x{height} {mode} {type(source).__name__} budget {budget}"
            assert pixel_values.dtype == np.float32 and position_ids.dtype == np.int64, case
            assert pixel_values.shape == (1, budget * 9, 16 * 16 * 3), case
            np.testing.assert_allclose(pixel_values, expected["pixel_values"], atol=1e-6, rtol=0, err_msg=case)
            np.testing.assert_array_equal(position_ids, expected["image_position_ids"], err_msg=case)
            assert n == expected["num_soft_tokens_per_image"][0] == num_soft_tokens(height, width, params=params)
            assert 0 < n <= budget and (position_ids[0, n * 9 :] == -1).all(), case


def test_image_soft_tokens_match_processor_counts(reference, processor_config: dict) -> None:
    params = ImageParams.from_dict(processor_config["image_processor"])
    sizes = [(480, 640), (1200, 300), (200, 1500), (900, 17), (3, 10_000), (48, 48), (4000, 3000)]
    expected = reference._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [num_soft_tokens(h, w, params=params) for h, w in sizes] == expected


def test_image_normalize_branch_matches() -> None:
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    settings = {"do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
                "max_soft_tokens": 140, "resample": 2}
    image = _picture(200, 120, "RGB")
    expected = Gemma4ImageProcessorPil(**settings)(image, return_tensors="np")
    pixel_values, _, _ = preprocess_image(image, params=ImageParams.from_dict(settings))
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)


def test_image_params() -> None:
    assert ImageParams.from_dict({"resample": "bicubic", "size": None}).resample == 3
    assert SUPPORTED_SOFT_TOKENS == (70, 140, 280, 560, 1120)
    with pytest.raises(InputError) as exc:
        ImageParams(max_soft_tokens=300)
    assert "70, 140, 280, 560, 1120" in _one_line(exc)
    with pytest.raises(InputError):
        ImageParams.from_dict({"do_resize": False})


def test_undecodable_image(tmp_path: Path) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(InputError) as exc:
        preprocess_image(bad, params=ImageParams())
    assert _one_line(exc).startswith(f"cannot decode image {bad}: ")
    truncated = tmp_path / "cut.png"
    _picture(64, 64, "RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(InputError) as exc:
        preprocess_image(truncated, params=ImageParams())
    assert _one_line(exc).startswith("cannot decode image")
    with pytest.raises(InputError) as exc:
        preprocess_image(tmp_path / "missing.png", params=ImageParams())
    assert "file not found" in _one_line(exc)


# --- WAV files ----------------------------------------------------------------------------

_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # KSDATAFORMAT_SUBTYPE_*


def _write_wav(path: Path, samples: np.ndarray, *, rate: int, encoding: str, extensible: bool = False) -> None:
    """A RIFF/WAVE file by hand: pcm16 / pcm24 / pcm32 / float32, with an odd-sized LIST
    chunk before the data so chunk skipping and padding are exercised."""
    x = samples if samples.ndim == 2 else samples[:, None]
    channels = x.shape[1]
    if encoding == "float32":
        tag, bits, data = 3, 32, x.astype("<f4").tobytes()
    elif encoding == "pcm24":
        ints = np.round(x * 8_388_607).astype("<i4")
        tag, bits, data = 1, 24, ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    elif encoding == "pcm32":
        tag, bits, data = 1, 32, np.round(x.astype(np.float64) * 2_147_483_647).astype("<i4").tobytes()
    else:
        tag, bits, data = 1, 16, np.round(x * 32767).astype("<i2").tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + _GUID_TAIL
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    chunks += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


def _write_pcm16_stdlib(path: Path, samples: np.ndarray, *, rate: int) -> np.ndarray:
    ints = np.round(samples * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if ints.ndim == 1 else ints.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())
    return ints


def _sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _level_db(x: np.ndarray, rate: int, freq: float) -> float:
    """Level of `freq` in dB relative to the strongest component (Hann-windowed FFT)."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(round(freq * len(x) / rate))
    return 20 * np.log10(spectrum[k - 2 : k + 3].max() / spectrum.max())


def test_read_16bit_mono(tmp_path: Path) -> None:
    ints = _write_pcm16_stdlib(tmp_path / "a.wav", _sine(440, 0.5, RATE), rate=RATE)
    x, rate = read_wav(tmp_path / "a.wav")
    assert rate == RATE and x.dtype == np.float32 and x.shape == (8000,)
    np.testing.assert_array_equal(x, ints / np.float32(32768))
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), x)


def test_read_24bit_stereo(tmp_path: Path) -> None:
    left, right = _sine(300, 0.25, 22_050), _sine(700, 0.25, 22_050, amplitude=0.25)
    stereo = np.stack([left, right], axis=1)
    for extensible in (False, True):
        path = tmp_path / f"s{int(extensible)}.wav"
        _write_wav(path, stereo, rate=22_050, encoding="pcm24", extensible=extensible)
        x, rate = read_wav(path)
        assert rate == 22_050 and x.shape == stereo.shape
        np.testing.assert_allclose(x, stereo, atol=2 / 8_388_608, rtol=0)
    np.testing.assert_allclose(to_mono(x), (left + right) / 2, atol=2e-7)
    mono = load_audio(path)
    assert mono.shape == (int(np.ceil(len(left) * 16_000 / 22_050)),)


def test_read_float32_and_pcm32(tmp_path: Path) -> None:
    signal = _sine(1000, 0.1, RATE, amplitude=0.9)
    for encoding, extensible, atol in [("float32", False, 0), ("float32", True, 0), ("pcm32", False, 1e-7)]:
        path = tmp_path / f"{encoding}{extensible}.wav"
        _write_wav(path, signal, rate=RATE, encoding=encoding, extensible=extensible)
        x, rate = read_wav(path)
        assert rate == RATE and x.dtype == np.float32
        np.testing.assert_allclose(x, signal, atol=atol, rtol=0)
    # A float WAV above full scale comes back scaled into [-1, 1], not clipped.
    _write_wav(tmp_path / "hot.wav", 2 * signal, rate=RATE, encoding="float32")
    hot = load_audio(tmp_path / "hot.wav")
    assert np.abs(hot).max() == pytest.approx(1.0) and np.allclose(hot, signal / 0.9, atol=1e-6)


def test_read_matches_soundfile(tmp_path: Path) -> None:
    soundfile = pytest.importorskip("soundfile")
    rng = np.random.default_rng(3)
    data = np.clip(rng.normal(0, 0.3, (4000, 2)), -1, 1).astype(np.float32)
    for subtype in ["PCM_16", "PCM_24", "PCM_32", "FLOAT"]:
        path = tmp_path / f"{subtype}.wav"
        soundfile.write(path, data, 44_100, subtype=subtype)
        expected, _ = soundfile.read(path, dtype="float32")
        x, rate = read_wav(path)
        assert rate == 44_100
        np.testing.assert_allclose(x, expected, atol=1e-7, rtol=0, err_msg=subtype)
    # Encodings edgekit does not decode itself (mu-law here) go through soundfile.
    ulaw = tmp_path / "ulaw.wav"
    soundfile.write(ulaw, data[:, 0], 8000, subtype="ULAW")
    x, rate = read_wav(ulaw)
    assert rate == 8000 and x.shape == (4000,)
    np.testing.assert_array_equal(x, soundfile.read(ulaw, dtype="float32")[0])
    assert load_audio(ulaw).shape == (8000,)


def test_48khz_is_resampled(tmp_path: Path) -> None:
    path = tmp_path / "48k.wav"
    # 1 kHz must survive; 11 kHz is above the 8 kHz Nyquist of 16 kHz and must not
    # fold back to 5 kHz (which linear interpolation or plain decimation would do).
    _write_wav(path, _sine(1000, 2.0, 48_000, 0.4) + _sine(11_000, 2.0, 48_000, 0.4), rate=48_000, encoding="pcm16")
    x = load_audio(path)
    assert x.dtype == np.float32 and x.shape == (32_000,)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    assert np.argmax(spectrum) * RATE / len(x) == pytest.approx(1000, abs=1)
    assert _level_db(x, RATE, 5000) < -50
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.01)


def test_8khz_is_resampled(tmp_path: Path) -> None:
    path = tmp_path / "8k.wav"
    _write_pcm16_stdlib(path, _sine(1000, 1.5, 8000), rate=8000)
    x = load_audio(path)
    assert x.shape == (24_000,)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    assert np.argmax(spectrum) * RATE / len(x) == pytest.approx(1000, abs=1)
    assert _level_db(x, RATE, 7000) < -50  # the spectral image of upsampling is filtered out


@pytest.mark.parametrize("src,dst", [(48_000, 16_000), (44_100, 16_000), (8000, 16_000), (22_050, 16_000),
                                     (16_000, 48_000)])
def test_resample_matches_scipy(src: int, dst: int) -> None:
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.3, src // 2 + 7).astype(np.float32)
    y = resample(x, src, dst)
    expected = signal.resample_poly(x.astype(np.float64), dst, src)
    assert y.shape == expected.shape == (-(-len(x) * dst // src),)
    np.testing.assert_allclose(y, expected, atol=1e-6, rtol=0)
    stereo = np.stack([x, -x], axis=1)
    np.testing.assert_allclose(resample(stereo, src, dst), np.stack([y, -y], axis=1), atol=1e-6)


# --- bad audio files ----------------------------------------------------------------------


def test_bad_audio_files(tmp_path: Path) -> None:
    not_wav = tmp_path / "notes.mp3"
    not_wav.write_bytes(b"ID3\x03\x00\x00\x00 not a riff file at all")
    with pytest.raises(InputError) as exc:
        load_audio(not_wav)
    assert _one_line(exc).startswith(f"{not_wav} is not a WAV file")

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        load_audio(empty)
    assert _one_line(exc) == f"{empty} is empty (0 bytes)"

    no_samples = tmp_path / "header_only.wav"
    _write_wav(no_samples, np.zeros(0, np.float32), rate=RATE, encoding="pcm16")
    assert wav_info(no_samples).frames == 0
    with pytest.raises(InputError) as exc:
        load_audio(no_samples)
    assert _one_line(exc) == f"{no_samples} is empty (0 samples)"

    for name, amplitude in [("zeros.wav", 0.0), ("hiss.wav", 5e-4)]:  # 5e-4 is -66 dBFS
        path = tmp_path / name
        _write_wav(path, _sine(440, 1.0, RATE, amplitude), rate=RATE, encoding="float32")
        with pytest.raises(InputError) as exc:
            load_audio(path)
        assert _one_line(exc) == f"{path} is silent (peak below -60 dBFS)"
    quiet = tmp_path / "quiet.wav"
    _write_wav(quiet, _sine(440, 1.0, RATE, 2e-3), rate=RATE, encoding="float32")
    assert load_audio(quiet).shape == (RATE,)

    long = tmp_path / "long.wav"
    _write_wav(long, np.tile(_sine(440, 1.0, RATE), 60), rate=RATE, encoding="pcm16")
    with pytest.raises(InputError) as exc:
        load_audio(long)
    assert _one_line(exc) == (f"{long} is 60.0 s long; the audio encoder takes at most 30 s per clip — "
                              "split it (edgekit translate splits at pauses)")

    with pytest.raises(InputError) as exc:
        load_audio(tmp_path / "nowhere.wav")
    assert "does not exist" in _one_line(exc)


def test_30_seconds_at_44_1_khz_fits(tmp_path: Path) -> None:
    path = tmp_path / "limit.wav"
    _write_pcm16_stdlib(path, np.tile(_sine(441, 1.0, 44_100), 30), rate=44_100)
    x = load_audio(path)
    assert x.shape == (30 * RATE,)
    assert num_audio_tokens(len(x)) == 750


# --- device side: no torch, no transformers ----------------------------------------------

_TORCH_FREE = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked on the device side")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
from PIL import Image
from edgekit.runtimes import image_preprocess, mel_features, wav_io

x = np.sin(np.arange(48_000) / 5.0).astype(np.float32) * 0.5
audio = wav_io.resample(wav_io.to_mono(np.stack([x, x], axis=1)), 48_000, 16_000)
features, mask = mel_features.log_mel_features(audio, params=mel_features.MelParams())
pixels, positions, n = image_preprocess.preprocess_image(Image.new("RGB", (64, 48)),
                                                         params=image_preprocess.ImageParams())
assert features.shape == (99, 128) and pixels.shape == (1, 2520, 768) and n > 0
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers"))
assert not loaded, loaded
print("torch-free")
"""


def test_runtime_modules_are_torch_free() -> None:
    result = subprocess.run([sys.executable, "-c", _TORCH_FREE], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch-free"
