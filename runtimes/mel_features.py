"""Log-mel features for the Gemma 4 audio tower, in numpy (no torch, no transformers).

A line-for-line port of transformers' Gemma4AudioFeatureExtractor
(transformers/models/gemma4/feature_extraction_gemma4.py, v5.23) for one clip, with the
same dtypes at every step so the result matches it to float32 rounding:

    waveform f32 [N]
      -> truncate/pad to a multiple of 128 samples   (__call__: pad_to_multiple_of=128)
      -> prepend frame_length // 2 zeros             ("semicausal" padding)
      -> frames of frame_length + 1, hop hop_length  (the extra sample feeds preemphasis)
      -> periodic Hann window, |rfft(n=fft_length)|  (float32 -> complex64)
      -> @ HTK mel filter bank (float64), log(x + mel_floor), optional per-bin mean/std
      -> float32, frames not wholly inside real audio zeroed and masked out

`num_audio_tokens` is Gemma4Processor._compute_audio_num_tokens (processing_gemma4.py):
mel framing followed by the audio tower's two stride-2 convolutions, 40 ms per token,
capped at 750 tokens (30 s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgekit.errors import InputError
from edgekit.models.gemma4 import limits

# Gemma4AudioFeatureExtractor.__call__ defaults: clips are zero-padded to a multiple of
# 128 samples and cut at 480000 samples (30 s at 16 kHz). Here a longer clip is an error
# instead of a silent cut: callers split long audio (edgekit translate splits at pauses).
PAD_TO_MULTIPLE_OF = 128
MAX_SAMPLES = 480_000

# Gemma4Processor.__init__ defaults: one soft token per 40 ms, at most 750 per clip.
AUDIO_MS_PER_TOKEN = limits.AUDIO_MS_PER_TOKEN
AUDIO_SEQ_LENGTH = limits.AUDIO_MAX_TOKENS

# Gemma4AudioSubSampleConvProjection (modeling_gemma4.py): two Conv2d layers with
# kernel 3, stride 2, padding 1 along time; architectural constants, not in any config.
_SSCP_LAYERS, _SSCP_KERNEL, _SSCP_STRIDE, _SSCP_PADDING = 2, 3, 2, 1

# Keys transformers saves in sample counts, derived from the *_ms fields (see from_dict).
_DERIVED_KEYS = ("frame_length", "hop_length", "fft_length")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MelParams:
    """Gemma4AudioFeatureExtractor's settings; field names are its config keys."""

    sampling_rate: int = 16_000
    feature_size: int = 128  # mel bins
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    padding_value: float = 0.0
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("per_bin_mean", "per_bin_stddev"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
                if len(value) != self.feature_size:
                    raise InputError(f"mel {name} has {len(value)} values; expected feature_size={self.feature_size}")
                object.__setattr__(self, name, value)
        if self.sampling_rate <= 0 or self.feature_size <= 0 or self.frame_length < 2 or self.hop_length < 1:
            raise InputError(f"invalid mel settings: {self}")
        if not 0.0 <= self.min_frequency <= self.max_frequency:
            raise InputError(f"mel min_frequency {self.min_frequency} must be in "
                             f"[0, max_frequency {self.max_frequency}]")

    # Sample counts exactly as Gemma4AudioFeatureExtractor.__init__ derives them.
    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return n * 2 if self.fft_overdrive else n

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MelParams:
        """From processor_config.json's "feature_extractor" section, preprocessor_config.json,
        or a manifest's audio settings; unknown keys are ignored.

        transformers saves frame_length / hop_length / fft_length in samples but never reads
        them back (__init__ recomputes them from the *_ms fields). They are checked here
        instead, so a file that disagrees with itself fails loudly rather than silently.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if isinstance(kwargs.get("mel_floor"), (list, np.ndarray)):  # to_dict of a 0-d array
            kwargs["mel_floor"] = float(np.asarray(kwargs["mel_floor"]).reshape(-1)[0])
        params = cls(**kwargs)
        for key in _DERIVED_KEYS:
            if d.get(key) is not None and int(d[key]) != getattr(params, key):
                raise InputError(
                    f"audio settings say {key}={d[key]} but transformers derives {getattr(params, key)} "
                    f"from frame_length_ms={params.frame_length_ms}, hop_length_ms={params.hop_length_ms} "
                    f"at {params.sampling_rate} Hz; fix the processor config"
                )
        return params


# --- mel filter bank (transformers.audio_utils.mel_filter_bank, norm=None, mel_scale="htk") ---


def _hertz_to_mel(freq: float | np.ndarray) -> float | np.ndarray:
    return 2595.0 * np.log10(1.0 + (freq / 700.0))


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    return 700.0 * (np.power(10, mels / 2595.0) - 1.0)


def mel_filter_bank(params: MelParams) -> np.ndarray:
    """[fft_length // 2 + 1, feature_size] float64 triangular HTK-mel filters, unnormalised.

    The top filter may be all zeros (it falls between FFT bins at 512 / 128); the
    reference only warns about it.
    """
    num_bins = params.fft_length // 2 + 1
    mel_freqs = np.linspace(_hertz_to_mel(params.min_frequency), _hertz_to_mel(params.max_frequency),
                            params.feature_size + 2)
    filter_freqs = _mel_to_hertz(mel_freqs)
    # audio_utils uses integer division for the top bin: linspace(0, sr // 2, bins).
    fft_freqs = np.linspace(0, params.sampling_rate // 2, num_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))


def _hann_periodic(length: int) -> np.ndarray:
    # audio_utils.window_function(length) default: periodic Hann = np.hanning(N + 1)[:-1].
    return np.hanning(length + 1)[:-1].astype(np.float32)


# --- features ----------------------------------------------------------------------------


def num_mel_frames(num_samples: int, *, params: MelParams) -> int:
    """Mel frames for `num_samples` real samples, before padding to a multiple of 128."""
    frames = (num_samples + params.frame_length // 2 - (params.frame_length + 1)) // params.hop_length + 1
    return max(frames, 0)


def log_mel_features(waveform: np.ndarray, *, params: MelParams) -> tuple[np.ndarray, np.ndarray]:
    """Gemma4AudioFeatureExtractor()([waveform]) for one mono clip at params.sampling_rate.

    Returns (features [T, feature_size] float32, mask [T] bool). T counts frames of the
    clip padded to a multiple of 128 samples; frames reaching into that padding are
    False in the mask and all-zero in the features, as in the reference.
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise InputError(f"log_mel_features takes a mono waveform [samples]; got shape {x.shape} (see wav_io.to_mono)")
    if len(x) > MAX_SAMPLES:
        raise InputError(f"audio is {len(x) / params.sampling_rate:.1f} s long; the audio encoder takes at most "
                         f"{MAX_SAMPLES / params.sampling_rate:g} s per clip — split it")
    # The reference pads in the input dtype, then casts float64 to float32.
    n = len(x)
    padded_len = -(-n // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    x = np.pad(x.astype(np.float32, copy=False), (0, padded_len - n), constant_values=params.padding_value)
    real = np.zeros(padded_len, dtype=bool)
    real[:n] = True

    if params.dither > 0.0:  # the reference draws from numpy's global RNG: not reproducible either way
        x = x + params.dither * np.random.default_rng().standard_normal(x.shape).astype(x.dtype)
    if params.input_scale_factor != 1.0:
        x = x * params.input_scale_factor

    # Semicausal padding: frame 0 is centred on t=0 (sl.STFT(time_padding="semicausal")).
    pad_left = params.frame_length // 2
    x = np.pad(x, (pad_left, 0))
    real = np.pad(real, (pad_left, 0))
    size = params.frame_length + 1  # one extra sample: the preemphasis look-back
    num_frames = max((len(x) - size) // params.hop_length + 1, 0)
    if num_frames == 0:
        return np.zeros((0, params.feature_size), np.float32), np.zeros(0, bool)
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[:: params.hop_length][:num_frames]

    if params.preemphasis > 0.0:
        if params.preemphasis_htk_flavor:
            first = frames[..., :1] * (1.0 - params.preemphasis)
            rest = frames[..., 1:-1] - params.preemphasis * frames[..., :-2]
            frames = np.concatenate([first, rest], axis=-1)
        else:
            frames = frames[..., 1:] - params.preemphasis * frames[..., :-1]
    else:
        frames = frames[..., :-1]

    spectrum = np.abs(np.fft.rfft(frames * _hann_periodic(params.frame_length), n=params.fft_length, axis=-1))
    log_mel = np.log(np.matmul(spectrum, mel_filter_bank(params)) + np.array(params.mel_floor, dtype=np.float64))
    if params.per_bin_mean is not None:
        log_mel = log_mel - np.array(params.per_bin_mean)
    if params.per_bin_stddev is not None:
        log_mel = log_mel / np.array(params.per_bin_stddev)

    # A frame is valid only if the last sample of its window is real audio.
    mask = real[np.arange(num_frames) * params.hop_length + size - 1]
    return log_mel.astype(np.float32) * mask[:, None], mask


def num_audio_tokens(num_samples: int, *, params: MelParams | None = None,
                     max_tokens: int = AUDIO_SEQ_LENGTH) -> int:
    """Audio soft tokens for a clip of `num_samples`: Gemma4Processor._compute_audio_num_tokens.

    Equals the number of True entries of the mask after the encoder's two stride-2
    convolutions, so it matches both the processor's placeholder count and the tower's
    output length.
    """
    params = params or MelParams()
    t = num_mel_frames(num_samples, params=params)
    if t <= 0:
        return 0
    for _ in range(_SSCP_LAYERS):
        t = (t + 2 * _SSCP_PADDING - _SSCP_KERNEL) // _SSCP_STRIDE + 1
    return min(t, max_tokens)


__all__ = ["MelParams", "log_mel_features", "mel_filter_bank", "num_audio_tokens", "num_mel_frames",
           "AUDIO_MS_PER_TOKEN", "AUDIO_SEQ_LENGTH", "MAX_SAMPLES", "PAD_TO_MULTIPLE_OF"]
