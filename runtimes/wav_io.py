"""WAV files -> float32 mono 16 kHz for the audio tower, in numpy only.

The RIFF chunks are parsed here rather than with the standard `wave` module, which
(before Python 3.12) reads neither IEEE-float nor WAVE_FORMAT_EXTENSIBLE files — what
most recorders and DAWs write for 24-bit, 32-bit float and multi-channel audio. Other
encodings inside a WAV (ADPCM, A-law, ...) are handed to soundfile when it is installed.

Resampling is band-limited: a Kaiser-windowed sinc low-pass applied in polyphase form,
the same filter design as scipy.signal.resample_poly (10 zero crossings per side, beta 5),
so 44.1 / 48 kHz recordings do not alias into the 0-8 kHz band the mel features see.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import BinaryIO

import numpy as np

from edgekit.errors import InputError

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE  # wFormatTag values (mmreg.h)
_SILENCE_DBFS = -60.0


@dataclasses.dataclass(frozen=True)
class WavInfo:
    """What the header of a WAV file says; `frames` counts samples per channel."""

    sample_rate: int
    channels: int
    frames: int  # exact for PCM / float; compressed encodings are counted once decoded
    bits_per_sample: int  # container width: 24-bit in a 32-bit container reads as 32
    format_tag: int  # 1 PCM, 3 IEEE float; an EXTENSIBLE file reports its sub-format
    data_offset: int
    block_align: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


# --- reading ------------------------------------------------------------------------------


def _not_wav(path: str, why: str) -> InputError:
    return InputError(f"{path} is not a WAV file ({why}); convert it: ffmpeg -i {path} -ac 1 -ar 16000 out.wav")


def _parse_header(f: BinaryIO, path: str, file_size: int) -> WavInfo:
    head = f.read(12)
    if file_size == 0:
        raise InputError(f"{path} is empty (0 bytes)")
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        why = "RF64 is not supported" if head[:4] == b"RF64" else "no RIFF/WAVE header"
        raise _not_wav(path, why)
    fmt: tuple[int, int, int, int, int] | None = None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            raise _not_wav(path, "no data chunk" if fmt else "no fmt chunk")
        chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if chunk_id == b"fmt ":
            body = f.read(size)
            if len(body) < 16:
                raise _not_wav(path, "truncated fmt chunk")
            tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
            fmt = (tag, channels, rate, block_align, bits)
            f.seek(size % 2, os.SEEK_CUR)  # chunks are padded to an even size
        elif chunk_id == b"data":
            if fmt is None:
                raise _not_wav(path, "data chunk before fmt chunk")
            tag, channels, rate, block_align, bits = fmt
            if channels < 1 or rate < 1 or block_align < 1:
                raise _not_wav(path, f"bad fmt chunk: {channels} channels at {rate} Hz")
            offset = f.tell()
            # Streaming writers leave the size at 0 or 0xFFFFFFFF: trust the file's length.
            available = max(file_size - offset, 0)
            size = available if size in (0, 0xFFFFFFFF) or size > available else size
            return WavInfo(sample_rate=rate, channels=channels, frames=size // block_align,
                           bits_per_sample=bits, format_tag=tag, data_offset=offset, block_align=block_align)
        else:
            f.seek(size + size % 2, os.SEEK_CUR)


def wav_info(path: str | os.PathLike[str]) -> WavInfo:
    """Parse a WAV header without reading the samples."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            return _parse_header(f, name, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        raise InputError(f"{name} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None


def _decode(raw: bytes, info: WavInfo, path: str) -> np.ndarray:
    """Interleaved sample bytes -> float32 [frames, channels], integer PCM scaled to [-1, 1)."""
    width = info.block_align // info.channels  # bytes per sample, container size
    tag = info.format_tag
    if tag == _PCM and width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0  # 8-bit WAV is unsigned
    elif tag == _PCM and width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8).astype(np.float32) / 8388608.0
    elif tag == _PCM and width == 4:  # also 24-in-32, which is left-justified
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    elif tag == _FLOAT and width in (4, 8):
        x = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float32)
    else:
        raise _unsupported(path, info)
    return x.reshape(-1, info.channels)


def _unsupported(path: str, info: WavInfo) -> InputError:
    bits = 8 * info.block_align // info.channels
    return InputError(f"{path} is a WAV file with format 0x{info.format_tag:04x}, {bits}-bit, which edgekit does not "
                      f"decode; convert it: ffmpeg -i {path} -c:a pcm_s16le out.wav")


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """(samples, sample_rate): float32 [frames] for mono, [frames, channels] otherwise.

    Reads 8/16/24/32-bit integer PCM and 32/64-bit float WAV (plain or EXTENSIBLE).
    """
    name = os.fspath(path)
    info = wav_info(name)
    if info.format_tag not in (_PCM, _FLOAT):
        return _read_with_soundfile(name, info)
    with open(name, "rb") as f:
        f.seek(info.data_offset)
        raw = f.read(info.frames * info.block_align)
    x = _decode(raw[: len(raw) // info.block_align * info.block_align], info, name)
    return (x[:, 0] if info.channels == 1 else x), info.sample_rate


def _read_with_soundfile(path: str, info: WavInfo) -> tuple[np.ndarray, int]:
    try:
        import soundfile  # optional: gemma-edgekit[dev]; decodes ADPCM, A-law, mu-law, ...
    except ImportError:
        raise _unsupported(path, info) from None
    try:
        x, rate = soundfile.read(path, dtype="float32", always_2d=False)
    except Exception as exc:  # soundfile raises its own LibsndfileError
        raise InputError(f"cannot decode {path}: {' '.join(str(exc).split())}") from None
    return np.ascontiguousarray(x), int(rate)


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of [frames, channels]; a 1-D signal is returned as is."""
    x = np.asarray(x)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise InputError(f"expected audio shaped [frames] or [frames, channels]; got {x.shape}")
    return x.mean(axis=1, dtype=np.float64).astype(np.float32)


# --- resampling ---------------------------------------------------------------------------


def _lowpass(up: int, down: int) -> tuple[np.ndarray, int]:
    """Kaiser-windowed sinc at the lower Nyquist, gain `up` (firwin + resample_poly's scaling)."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    m = np.arange(2 * half_len + 1) - half_len
    h = np.sinc(m / max_rate) / max_rate * np.kaiser(2 * half_len + 1, 5.0)
    return h * (up / h.sum()), half_len


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited rational resampling along axis 0; ceil(n * dst / src) output samples.

    Output m sits at input time m * src / dst (no delay), like scipy.signal.resample_poly:

        y[m] = sum_i x[i] * h(m * down - i * up),   up / down = dst / src in lowest terms
    """
    x = np.asarray(x, dtype=np.float32)
    if src_rate <= 0 or dst_rate <= 0:
        raise InputError(f"sample rates must be positive; got {src_rate} -> {dst_rate}")
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    if up == down:
        return x.copy()
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)
    h, half_len = _lowpass(up, down)
    taps = 2 * half_len // up + 1  # input samples under the filter for one output

    # Polyphase table: the filter taps seen by an output depend only on its phase.
    # For output m, i0 = ceil((m * down - half_len) / up) is the first input used and
    # j0 = m * down + half_len - i0 * up in (2 * half_len - up, 2 * half_len] its tap.
    phases = np.arange(up)
    j = (2 * half_len - up + 1 + phases)[:, None] - up * np.arange(taps)[None, :]
    table = np.where(j >= 0, h[np.clip(j, 0, None)], 0.0).astype(np.float32)  # [up, taps]

    pad = taps + 1  # zeros around x so every gathered index is valid
    xp = np.concatenate([np.zeros((pad,) + x.shape[1:], x.dtype), x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.empty((n_out,) + x.shape[1:], np.float32)
    chunk = max(1, (1 << 21) // taps)  # ~2M gathered samples at a time
    for start in range(0, n_out, chunk):
        t = np.arange(start, min(start + chunk, n_out), dtype=np.int64) * down
        i0 = -((half_len - t) // up)
        phase = t + half_len - i0 * up - (2 * half_len - up + 1)
        gathered = xp[(i0 + pad)[:, None] + np.arange(taps)[None, :]]  # [m, taps, ...]
        y[start : start + len(t)] = np.einsum("mr,mr...->m...", table[phase], gathered)
    return y


# --- the clip the audio tower takes -------------------------------------------------------


def _check_length(name: str, frames: int, rate: int, max_seconds: float) -> None:
    if frames == 0:
        raise InputError(f"{name} is empty (0 samples)")
    if frames / rate > max_seconds:
        raise InputError(f"{name} is {frames / rate:.1f} s long; the audio encoder takes at most {max_seconds:g} s "
                         f"per clip — split it (edgekit translate splits at pauses)")


def load_audio(path: str | os.PathLike[str], *, target_rate: int = 16_000, max_seconds: float = 30.0) -> np.ndarray:
    """A WAV file as float32 mono at `target_rate` in [-1, 1], ready for log_mel_features.

    Raises InputError (one line) for a file that is missing, not a WAV, empty, silent
    (peak below -60 dBFS) or longer than `max_seconds`.
    """
    name = os.fspath(path)
    info = wav_info(name)
    if info.format_tag in (_PCM, _FLOAT):  # header only: reject long files before decoding them
        _check_length(name, info.frames, info.sample_rate, max_seconds)
    x, rate = read_wav(name)
    _check_length(name, x.shape[0], rate, max_seconds)  # compressed WAVs: known only once decoded
    x = to_mono(x)
    if not np.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite samples")
    peak = float(np.max(np.abs(x)))
    if peak < 10 ** (_SILENCE_DBFS / 20):
        raise InputError(f"{name} is silent (peak below {_SILENCE_DBFS:g} dBFS)")
    if rate != target_rate:
        x = resample(x, rate, target_rate)
        # ceil(n * up / down) can pass the limit by one sample for a clip right at it.
        x = x[: int(max_seconds * target_rate)]
        peak = float(np.max(np.abs(x)))
    if peak > 1.0:  # float WAVs may exceed full scale; scaling keeps the waveform, clipping would not
        x = x / peak
    return np.ascontiguousarray(x, dtype=np.float32)


__all__ = ["WavInfo", "load_audio", "read_wav", "resample", "to_mono", "wav_info"]
