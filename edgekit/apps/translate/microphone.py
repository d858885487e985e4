"""Microphone capture for the live translator: PortAudio (sounddevice) -> utterances.

    PortAudio thread          capture thread                         caller (translates)
    ─────────────────         ─────────────────────────────────      ──────────────────────
    callback(indata) ──► raw  mono ─► resample to 16 kHz ─► VAD ──► utterances ──► for u in mic.utterances()
                     queue                                          queue (bounded)

The PortAudio callback only copies the block into a queue: it must never wait. The
capture thread does the rest, so listening goes on while the caller translates the
previous utterance. Both queues are bounded; when one overflows (translation has fallen
minutes behind, or the machine is starved) the oldest audio is dropped and the caller
hears about it through `on_notice`, never silently.

sounddevice is imported only when a Microphone starts (`gemma-edgekit[audio]`; it needs the
PortAudio library: `apt install libportaudio2`), so WAV input works without either.
A test can hand in any object with sounddevice's `query_devices`, `check_input_settings`
and `InputStream` (callback + finished_callback) as `sd`.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from edgekit.errors import InputError, MissingDependencyError, NotAvailableError, install_line
from edgekit.apps.translate.vad import EnergyVad, PushToTalk, Segment
from edgekit.runtimes.wav_io import resample

_HOW_TO_CHECK = "list the devices with `python -m sounddevice` (or `arecord -l`)"


class Segmenter(Protocol):
    """EnergyVad or PushToTalk: samples in, finished utterances out."""

    def push(self, samples: np.ndarray) -> list[Segment]: ...

    def flush(self) -> list[Segment]: ...


# --- sounddevice, imported on demand --------------------------------------------------------


def import_sounddevice() -> ModuleType:
    """`import sounddevice`, or a MissingDependencyError that says how to install what is missing."""
    try:
        import sounddevice
    except ImportError:
        raise MissingDependencyError("--mic needs sounddevice, which is not installed; install it with: "
                                     f"{install_line('audio')} (and apt install libportaudio2)") from None
    except OSError as exc:  # sounddevice imports fine but cannot find libportaudio.so
        raise MissingDependencyError(f"--mic needs the PortAudio library ({exc}); install it with: "
                                     f"sudo apt install libportaudio2, then {_HOW_TO_CHECK}") from None
    except Exception as exc:  # sounddevice starts PortAudio on import: its PortAudioError
        if type(exc).__name__ != "PortAudioError":
            raise
        raise NotAvailableError(f"--mic: PortAudio could not start ({exc}); {_HOW_TO_CHECK}") from None
    return sounddevice


def _sd_errors(sd: Any) -> tuple[type[BaseException], ...]:
    return tuple(e for e in (getattr(sd, "PortAudioError", None), ValueError) if isinstance(e, type))


@dataclass(frozen=True)
class InputDevice:
    """The input device a stream will open, and the rate and channels it will run at."""

    index: int | str | None  # what PortAudio is asked for (None: the default input)
    name: str
    sample_rate: int
    channels: int


def find_input_device(sd: Any, device: int | str | None, *, rate: int) -> InputDevice:
    """Resolve `device` (index, name substring or None for the default) to an input device
    and pick its rate: `rate` if the device takes it, else its default rate (resampled later)."""
    errors = _sd_errors(sd)
    try:
        info = sd.query_devices(device, "input")
    except errors as exc:
        which = f"named {device!r}" if isinstance(device, str) else f"number {device}" if device is not None \
            else "(no default input device)"
        raise InputError(f"no microphone: PortAudio finds no input device {which} ({_one_line(exc)}); plug one in "
                         f"and {_HOW_TO_CHECK}, then pass --input-device") from None
    name = str(info.get("name", device))
    max_channels = int(info.get("max_input_channels", 0))
    if max_channels < 1:
        raise InputError(f"{name} has no input channels; pick a microphone: {_HOW_TO_CHECK}")
    for try_rate in dict.fromkeys([rate, int(round(float(info.get("default_samplerate") or rate)))]):
        for try_channels in dict.fromkeys([1, min(2, max_channels)]):
            try:
                sd.check_input_settings(device=device, channels=try_channels, dtype="float32", samplerate=try_rate)
            except errors:
                continue
            return InputDevice(device, name, try_rate, try_channels)
    raise InputError(f"{name} takes neither {rate} Hz nor its default rate, mono or stereo; {_HOW_TO_CHECK}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- resampling a stream ---------------------------------------------------------------------


class StreamResampler:
    """wav_io.resample for a stream in blocks: the same output as resampling the whole
    stream at once (up to float rounding), each sample emitted once its filter taps
    have all arrived.

    Output m sits at input time m * src / dst. The buffer keeps the inputs the next
    outputs still need and starts on a multiple of `down`, so its outputs fall on the
    stream's own output grid.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        g = math.gcd(src_rate, dst_rate)
        self.src, self.dst = src_rate, dst_rate
        self.up, self.down = dst_rate // g, src_rate // g
        self.reach = 10 * max(self.up, self.down) // self.up + 2  # filter half-width in input samples, rounded up
        self._buf = np.zeros(0, np.float32)
        self._buf_start = 0  # stream index of _buf[0]
        self._next = 0  # next output index to emit

    def push(self, block: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(block, np.float32).reshape(-1), final=False)

    def flush(self) -> np.ndarray:
        return self._run(np.zeros(0, np.float32), final=True)

    def _run(self, block: np.ndarray, *, final: bool) -> np.ndarray:
        if self.up == self.down:
            return block.copy()
        self._buf = np.concatenate([self._buf, block])
        end = self._buf_start + len(self._buf)  # inputs available: [.., end)
        # Output m needs inputs up to m * down / up + reach; at the end, zeros stand for the rest.
        last = -(-end * self.up // self.down) if final else ((end - self.reach) * self.up) // self.down + 1
        if last <= self._next:
            return np.zeros(0, np.float32)
        y = resample(self._buf, self.src, self.dst)  # y[j] is output _buf_start * up / down + j
        base = self._buf_start * self.up // self.down
        out = y[self._next - base: last - base]
        self._next = last
        keep_from = max(self._next * self.down // self.up - self.reach, self._buf_start)
        keep_from -= keep_from % self.down
        self._buf = self._buf[keep_from - self._buf_start:]
        self._buf_start = keep_from
        return out


# --- capture ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CaptureStats:
    """What was heard and lost; `dropped_s` is 0 unless a queue overflowed."""

    captured_s: float
    dropped_s: float
    device_overflows: int  # PortAudio's own input_overflow flags (the sound card lost samples)


_END = object()


class Microphone:
    """Listen on an input device and yield utterances; use as a context manager.

        with Microphone(segmenter=EnergyVad(), on_notice=print) as mic:
            for segment in mic.utterances():
                ...  # translate; capture goes on meanwhile

    `duration_s` stops listening after that much audio (counted in samples, not wall time);
    otherwise it runs until `close()` or the stream stops. `stopped_by_device` says whether
    the stream ended on its own (unplugged device) rather than as asked.
    """

    def __init__(self, *, segmenter: Segmenter, rate: int = 16_000, device: int | str | None = None,
                 block_s: float = 0.1, max_pending: int = 16, max_raw_s: float = 20.0,
                 duration_s: float | None = None, on_notice: Callable[[str], None] | None = None,
                 sd: Any = None) -> None:
        if max_pending < 1:
            raise InputError(f"max_pending must be >= 1; got {max_pending}")
        self.segmenter, self.rate, self.block_s = segmenter, rate, block_s
        self.on_notice = on_notice or (lambda message: None)
        self.duration_s = duration_s
        self._sd = sd if sd is not None else import_sounddevice()
        self.device = find_input_device(self._sd, device, rate=rate)
        self._resampler = StreamResampler(self.device.sample_rate, rate)
        self._raw: queue.Queue = queue.Queue(maxsize=max(1, int(max_raw_s / block_s)))
        self.max_pending = max_pending
        self._ready: queue.Queue = queue.Queue()  # bounded by _offer, so the end marker always fits
        self._stop = threading.Event()
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._raw_dropped = 0  # device-rate frames lost at the raw queue (written by the callback only)
        self._overflows = 0
        self._dropped = 0  # output-rate samples lost at the utterance queue
        self._captured = 0  # output-rate samples handed to the segmenter
        self._closing = False
        self._error: BaseException | None = None
        self.stopped_by_device = False

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Microphone:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        dev = self.device
        try:
            self._stream = self._sd.InputStream(
                samplerate=dev.sample_rate, channels=dev.channels, dtype="float32", device=dev.index,
                blocksize=max(1, int(dev.sample_rate * self.block_s)), callback=self._callback,
                finished_callback=self._finished)
            self._thread = threading.Thread(target=self._capture, name="edgekit-capture", daemon=True)
            self._thread.start()
            self._stream.start()
        except _sd_errors(self._sd) as exc:
            self.close()
            raise InputError(f"cannot open the microphone {dev.name!r} ({_one_line(exc)}); {_HOW_TO_CHECK}") from None

    def close(self) -> None:
        self._closing = True
        self._stop.set()
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
                stream.close()
            except Exception:  # closing a stream whose device is gone: nothing left to do
                pass
        self._put_raw(_END)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # --- PortAudio's thread: copy and go -----------------------------------------------------
    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        if self._stop.is_set():
            return
        if status and getattr(status, "input_overflow", False):
            self._overflows += 1
        if not self._put_raw(np.array(indata, np.float32, copy=True)):
            self._raw_dropped += frames

    def _finished(self) -> None:
        self._put_raw(_END)

    def _put_raw(self, item: Any) -> bool:
        try:
            self._raw.put_nowait(item)
            return True
        except queue.Full:
            if item is _END:  # the end must get through: make room
                self._drain_one(self._raw)
                self._raw.put_nowait(item)
            return False

    # --- capture thread ----------------------------------------------------------------------
    def _capture(self) -> None:
        limit = None if self.duration_s is None else int(round(self.duration_s * self.rate))
        reported = (0, 0)
        try:
            while limit is None or self._captured < limit:
                item = self._raw.get()
                if item is _END:
                    self.stopped_by_device = not self._closing
                    self._feed(self._resampler.flush(), limit)
                    break
                mono = item.mean(axis=1, dtype=np.float32) if item.ndim == 2 else item.reshape(-1)
                self._feed(self._resampler.push(mono), limit)
                if (self._raw_dropped, self._overflows) != reported:
                    reported = self._report(reported)
            for segment in self.segmenter.flush():
                self._offer(segment)
            self._report(reported)
        except BaseException as exc:  # handed to the caller's thread by utterances()
            self._error = exc
        finally:
            self._stop.set()
            self._ready.put(_END)

    def _feed(self, audio: np.ndarray, limit: int | None) -> None:
        if limit is not None:
            audio = audio[: max(limit - self._captured, 0)]
        self._captured += len(audio)
        for segment in self.segmenter.push(audio):
            self._offer(segment)

    def _report(self, reported: tuple[int, int]) -> tuple[int, int]:
        raw_dropped, overflows = self._raw_dropped, self._overflows
        if raw_dropped > reported[0]:
            self.on_notice(f"audio capture fell behind: {(raw_dropped - reported[0]) / self.device.sample_rate:.1f} s "
                           "of microphone input dropped (the machine is overloaded)")
        if overflows > reported[1]:
            self.on_notice(f"the sound card reported {overflows - reported[1]} input overflow(s): "
                           "samples were lost before edgekit saw them")
        return raw_dropped, overflows

    def _offer(self, segment: Segment) -> None:
        """Queue an utterance; when max_pending are already waiting, drop the oldest and say so.

        Only this thread puts, so the size check cannot race with another put.
        """
        while self._ready.qsize() >= self.max_pending:
            old = self._drain_one(self._ready)
            if isinstance(old, Segment):
                self._dropped += len(old.audio)
                self.on_notice(f"translation is falling behind: dropped the {old.seconds:.1f} s utterance heard "
                               f"at {old.start_s:.1f} s ({self.max_pending} were waiting); use a faster bundle "
                               "or a lower --max-new-tokens")
        self._ready.put(segment)

    @staticmethod
    def _drain_one(q: queue.Queue) -> Any:
        try:
            return q.get_nowait()
        except queue.Empty:
            return None

    # --- caller's thread -----------------------------------------------------------------------
    def utterances(self) -> Iterator[Segment]:
        """Utterances in the order they were spoken, until the stream ends or close()."""
        while True:
            item = self._ready.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    @property
    def stats(self) -> CaptureStats:
        return CaptureStats(captured_s=self._captured / self.rate,
                            dropped_s=self._dropped / self.rate + self._raw_dropped / self.device.sample_rate,
                            device_overflows=self._overflows)


__all__ = ["CaptureStats", "InputDevice", "Microphone", "Segmenter", "StreamResampler", "find_input_device",
           "import_sounddevice", "EnergyVad", "PushToTalk"]
