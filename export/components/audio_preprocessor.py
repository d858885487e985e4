"""Waveform -> log-mel frames for the audio tower, as a graph: the `audio_preprocessor` method.

With it a device needs only the .pte and the tokenizer: no FFT library, no numpy port.
It computes what edgekit.runtimes.mel_features.log_mel_features computes (itself a port of
transformers' Gemma4AudioFeatureExtractor, feature_extraction_gemma4.py, v5.23), with no
learned weights: its buffers are constants derived from MelParams.

No FFT op: ExecuTorch's portable kernels and XNNPACK have none. The real DFT of a frame is
a product with constant cos / sin matrices, built in float64 and stored in float32, with
everything linear before it folded in (input_scale_factor, preemphasis, the periodic Hann
window, the zero padding to fft_length). Framing is reshapes and slices, no unfold/gather:

    waveform [N]  (N = 128 k, zero-padded by the caller; num_samples [1] = real length)
      │ pad frame_length//2 zeros left ("semicausal"), c*hop - (frame_length+1) right
      ▼
    chunks [M, hop]            M = len // hop,  c = ceil((frame_length + 1) / hop)
      │ frame t = chunks[t], ..., chunks[t+c-1] side by side, cut to frame_length+1
      ▼   (the last chunk contributes its first frame_length+1 - (c-1)*hop samples)
    frames [T, frame_length+1]     T = M - c + 1 = the reference's frame count
      │ linear with dft [2B, frame_length+1]  (B = fft_length//2 + 1; re rows, then im)
      ▼
    |X| = sqrt(re^2 + im^2) [T, B] ─► linear with mel filters ─► log(x + mel_floor)
      ─► optional (x - per_bin_mean) / per_bin_stddev ─► zeroed where not mask
    mask[t] = t*hop + frame_length - frame_length//2 < num_samples
              (the frame's last sample is real audio, not the caller's padding)

Values: fp32 products against numpy's float32 rfft and float64 mel product; the parity
bound is in tests/test_audio_preprocessor.py. Dither (random noise, off in Gemma 4's
config) has no deterministic equivalent and is refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgekit.errors import ExportError
from edgekit.runtimes.mel_features import MAX_SAMPLES, PAD_TO_MULTIPLE_OF, MelParams, mel_filter_bank


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _constant(values) -> torch.Tensor:
    """float32 and contiguous: torch.tensor keeps a transposed array's strides, and
    ExecuTorch's constant dim-order pass fails on a non-contiguous buffer."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _folded_dft(params: MelParams) -> np.ndarray:
    """[2B, frame_length+1] float64: a raw frame -> real and imaginary rfft bins of the
    scaled, preemphasized, Hann-windowed frame zero-padded to fft_length."""
    length, fft, p = params.frame_length, params.fft_length, params.preemphasis
    # Preemphasis as a [L, L+1] matrix on the raw frame (mel_features.log_mel_features).
    pre = np.zeros((length, length + 1))
    if p > 0.0 and params.preemphasis_htk_flavor:
        pre[0, 0] = 1.0 - p
        idx = np.arange(1, length)
        pre[idx, idx], pre[idx, idx - 1] = 1.0, -p
    elif p > 0.0:
        idx = np.arange(length)
        pre[idx, idx + 1], pre[idx, idx] = 1.0, -p
    else:
        pre[np.arange(length), np.arange(length)] = 1.0
    # The reference's window is float32 (audio_utils.window_function, periodic Hann).
    window = np.hanning(length + 1)[:-1].astype(np.float32).astype(np.float64)
    # Exact angles: (n * k) mod fft before scaling, so large products lose nothing.
    n, k = np.arange(length)[:, None], np.arange(fft // 2 + 1)[None, :]
    angle = 2.0 * np.pi * ((n * k) % fft) / fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # [L, 2B]
    return (pre.T @ (params.input_scale_factor * window[:, None] * basis)).T


class LogMelSpectrogram(nn.Module):
    """(waveform Float[N], num_samples Long[1]) -> (features Float[1,T,mels], mask Bool[1,T]).

    N is the clip zero-padded (with params.padding_value) to a multiple of 128 samples,
    min_samples <= N <= MAX_SAMPLES; num_samples is its real length. Padding further (to
    min_samples, or to a bucket) only appends masked, zeroed frames: the real frames do
    not change. Eager also takes shorter N, down to 0 (then no frames, as the reference).
    """

    def __init__(self, params: MelParams) -> None:
        super().__init__()
        if params.dither > 0.0:
            raise ExportError(f"mel dither={params.dither} adds random noise, which the exported audio "
                              "preprocessor cannot reproduce; export with dither 0 (Gemma 4's setting)")
        self.params = params
        self.hop = params.hop_length
        self.pad_left = params.frame_length // 2
        self.chunks_per_frame = math.ceil((params.frame_length + 1) / self.hop)
        # Samples the last chunk gives each frame; right padding so the chunk count is right.
        self.last_chunk = params.frame_length + 1 - (self.chunks_per_frame - 1) * self.hop
        self.pad_right = self.hop - self.last_chunk
        # A frame is valid iff its last sample, frame_length - pad_left past t*hop, is real.
        self.last_sample = params.frame_length - self.pad_left
        # The exported graph needs T >= 2 frames: torch.export specializes T == 1 away (a
        # size-1 dim broadcasts differently). 384 samples (24 ms) for Gemma 4's 20/10 ms.
        self.min_samples = _round_up(params.frame_length + 1 + self.hop - self.pad_left, PAD_TO_MULTIPLE_OF)
        if self.min_samples > MAX_SAMPLES:
            raise ExportError(f"mel frames of {params.frame_length_ms} ms do not fit a {MAX_SAMPLES}-sample clip")
        self.num_bins = params.fft_length // 2 + 1
        self.mel_bins = params.feature_size
        self.mel_floor = float(params.mel_floor)
        self.register_buffer("dft", _constant(_folded_dft(params)), persistent=False)
        self.register_buffer("mel_filters", _constant(mel_filter_bank(params).T), persistent=False)
        mean, std = params.per_bin_mean, params.per_bin_stddev
        self.register_buffer("mean", None if mean is None else _constant(mean), persistent=False)
        self.register_buffer("std", None if std is None else _constant(std), persistent=False)

    def example_inputs(self, seconds: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample for tracing: `seconds` of noise padded to a multiple of 128 samples."""
        real = max(int(seconds * self.params.sampling_rate), self.min_samples - 1)
        padded = _round_up(real, PAD_TO_MULTIPLE_OF)
        wave = torch.zeros(padded)
        wave[:real] = 0.1 * torch.randn(real, generator=torch.Generator().manual_seed(0))
        return wave, torch.tensor([real], dtype=torch.long)

    def dynamic_shapes(self) -> tuple[dict[int, object], None]:
        """torch.export dynamic_shapes for (waveform, num_samples): N = 128 * blocks."""
        blocks = torch.export.Dim("audio_blocks", min=self.min_samples // PAD_TO_MULTIPLE_OF,
                                  max=MAX_SAMPLES // PAD_TO_MULTIPLE_OF)
        return {0: PAD_TO_MULTIPLE_OF * blocks}, None

    def forward(self, waveform: torch.Tensor, num_samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(waveform, (self.pad_left, self.pad_right))
        count = x.shape[0] // self.hop
        chunks = x[: count * self.hop].reshape(count, self.hop)
        frames_out = torch.sym_max(count - self.chunks_per_frame + 1, 0)  # N < 20 ms: none
        last = self.chunks_per_frame - 1
        frames = torch.cat([chunks[j: j + frames_out] for j in range(last)]
                           + [chunks[last: last + frames_out, : self.last_chunk]], dim=1)
        spectrum = F.linear(frames, self.dft)  # [T, 2B]
        re, im = spectrum[:, : self.num_bins], spectrum[:, self.num_bins:]
        magnitude = torch.sqrt(re * re + im * im)
        log_mel = torch.log(F.linear(magnitude, self.mel_filters) + self.mel_floor)
        if self.mean is not None:
            log_mel = log_mel - self.mean
        if self.std is not None:
            log_mel = log_mel / self.std
        starts = torch.arange(frames_out, dtype=torch.long, device=waveform.device) * self.hop
        mask = (starts + self.last_sample) < num_samples
        features = log_mel * mask[:, None].to(log_mel.dtype)
        return features.unsqueeze(0), mask.unsqueeze(0)
