"""Speech -> utterances: an energy voice-activity detector, push-to-talk, and a file splitter.

The audio tower takes at most 30 s per clip, and a live translator should answer after
each sentence, so a stream is cut into utterances at pauses. The detector is energy-based
(no model, a few microseconds per frame on a Pi):

    samples ─► 30 ms frames ─► power in the 100-4000 Hz band, dBFS ─► noise floor = min of the levels over a sliding
    window (1.5 s back, 0.5 s ahead: "minimum statistics", Martin 2001, without the bias
    correction) ─► a frame is loud when it is `start_db` over the floor, voiced when
    `stop_db` over it (hysteresis), and never when under `min_level_dbfs`

    silent ──(start_frames loud frames in a row)──► speech ──(hangover of unvoiced frames)──► silent
            utterance = pre-roll + speech + a short tail; shorter than min_speech: dropped (a click)
            at max_seconds: cut at the quietest frame of the last split_search_s, keep going

The floor is a minimum over a window rather than a running average so that stationary
noise (a fan, a street) never opens an utterance however loud it is, speech right at the
start of a file is still heard (the look-ahead sees the first pause), and the floor
follows a room that gets louder within a window's length.

Everything is decided per frame from a grid that starts at sample 0, so pushing a stream
in blocks of any size gives the same utterances as pushing it whole: the microphone and
a WAV file of the same samples give the same cuts.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from edgekit.errors import InputError

_DIGITAL_SILENCE_DBFS = -100.0  # what an all-zero frame measures (log of 0 clamped)


@dataclass(frozen=True, kw_only=True)
class VadParams:
    """Settings of the energy detector; the defaults suit a USB microphone at arm's length."""

    sample_rate: int = 16_000
    frame_ms: float = 30.0
    band_hz: tuple[float, float] = (100.0, 4000.0)  # frame levels count only this band (see frame_levels)
    start_db: float = 10.0  # a frame this far over the noise floor is loud (opens an utterance)
    stop_db: float = 6.0  # ... this far over it still counts as speech (keeps one open)
    min_level_dbfs: float = -55.0  # quieter frames are never speech, whatever the floor
    floor_back_s: float = 1.5  # noise floor: minimum level over this much past audio ...
    floor_ahead_s: float = 0.5  # ... and this much look-ahead (the decision latency)
    start_frames: int = 3  # loud frames in a row to open an utterance (90 ms: not a click)
    hangover_s: float = 0.7  # unvoiced time that ends an utterance (longer than a breath)
    pre_roll_s: float = 0.3  # audio kept before the onset (soft first consonants)
    tail_s: float = 0.3  # audio kept after the last voiced frame
    min_speech_s: float = 0.25  # utterances with less voiced time are dropped
    max_seconds: float = 30.0  # the audio tower's limit per clip
    split_search_s: float = 5.0  # a long utterance is cut at the quietest frame this close to the limit

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.frame_ms <= 0:
            raise InputError(f"VAD sample_rate and frame_ms must be positive; got {self.sample_rate}, {self.frame_ms}")
        if self.stop_db > self.start_db:
            raise InputError(f"VAD stop_db ({self.stop_db}) must not exceed start_db ({self.start_db})")
        if self.max_seconds < 2 * self.split_search_s or self.split_search_s <= 0:
            raise InputError(f"VAD max_seconds ({self.max_seconds}) must be at least twice split_search_s "
                             f"({self.split_search_s}) > 0")

    @property
    def frame(self) -> int:
        return int(round(self.sample_rate * self.frame_ms / 1000))

    def frames(self, seconds: float) -> int:
        return int(round(seconds * 1000 / self.frame_ms))

    @property
    def max_frames(self) -> int:
        # Whole frames only, so an utterance never passes max_seconds.
        return int(self.max_seconds * self.sample_rate) // self.frame


@dataclass(frozen=True)
class Segment:
    """One utterance: mono samples and where they start in the stream (in samples)."""

    audio: np.ndarray
    start: int
    sample_rate: int

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


def frame_levels(samples: np.ndarray, *, frame: int, rate: int,
                 band_hz: tuple[float, float] = (100.0, 4000.0)) -> np.ndarray:
    """Level in dBFS of each whole frame of `samples`, counting only the speech band.

    The power between band_hz (Hann-windowed FFT, scaled so a full-scale sine in the band
    reads -3 dBFS like its RMS) leaves out what is not speech but would move a plain RMS:
    a cheap microphone's DC offset, the rumble of traffic and air conditioning, hiss above
    4 kHz. Brown noise, whose plain frame RMS swings over 30 dB, swings under 10 here.
    """
    n = len(samples) // frame
    if n == 0:
        return np.zeros(0)
    frames = np.asarray(samples[: n * frame], np.float64).reshape(n, frame)
    window = np.hanning(frame + 1)[:-1]
    fft = 1 << (frame - 1).bit_length()
    freqs = np.fft.rfftfreq(fft, 1.0 / rate)
    band = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    spectrum = np.fft.rfft(frames * window, n=fft, axis=1)[:, band]
    power = 2.0 * np.sum(spectrum.real ** 2 + spectrum.imag ** 2, axis=1) / (frame * np.sum(window ** 2))
    return np.maximum(10.0 * np.log10(np.maximum(power, 1e-30)), _DIGITAL_SILENCE_DBFS)


def quietest_cut(levels: np.ndarray, lo: int, hi: int) -> int:
    """The frame index in [lo, hi) to cut before: the middle of the quietest 150 ms stretch.

    Levels are averaged over 5 frames so one quiet frame between syllables loses to a real
    pause; ties go to the latest frame (the longest first piece).
    """
    lo, hi = max(lo, 0), min(hi, len(levels))
    if hi <= lo:
        return hi
    smooth = np.convolve(levels, np.ones(5) / 5, mode="same")[lo:hi]
    return lo + int(len(smooth) - 1 - np.argmin(smooth[::-1]))


# --- file splitting ------------------------------------------------------------------------


def split_long(waveform: np.ndarray, rate: int, *, max_seconds: float = 30.0,
               search_seconds: float = 5.0, frame_ms: float = 30.0) -> list[Segment]:
    """Cut a clip into pieces of at most `max_seconds`, each cut at the quietest moment of
    the last `search_seconds` before the limit. Nothing is dropped: the pieces concatenate
    to the input. A clip within the limit comes back whole."""
    x = np.asarray(waveform, np.float32)
    limit = int(max_seconds * rate)
    if len(x) <= limit:
        return [Segment(x, 0, rate)]
    frame = int(round(rate * frame_ms / 1000))
    levels = frame_levels(x, frame=frame, rate=rate)
    max_frames, search = limit // frame, max(int(search_seconds * 1000 / frame_ms), 1)
    pieces, start = [], 0  # start: a frame index
    while len(x) - start * frame > limit:
        cut = quietest_cut(levels, start + max_frames - search, start + max_frames)
        cut = max(cut, start + 1)
        pieces.append(Segment(x[start * frame: cut * frame], start * frame, rate))
        start = cut
    pieces.append(Segment(x[start * frame:], start * frame, rate))
    return pieces


# --- streaming detectors --------------------------------------------------------------------


class _Framer:
    """Collects pushed samples into whole frames on a grid that starts at sample 0."""

    def __init__(self, frame: int) -> None:
        self.frame = frame
        self._rest = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(samples, np.float32).reshape(-1)
        if len(self._rest):
            x = np.concatenate([self._rest, x])
        n = len(x) // self.frame
        self._rest = x[n * self.frame:].copy()
        return [x[i * self.frame:(i + 1) * self.frame] for i in range(n)]

    def rest(self) -> np.ndarray:
        """The partial frame at the end of the stream (taken: the framer is then empty)."""
        rest, self._rest = self._rest, np.zeros(0, np.float32)
        return rest


class _Utterance:
    """Frames of the utterance being collected, with their levels (for the 30 s cut)."""

    def __init__(self, first_frame: int) -> None:
        self.first = first_frame  # frame index in the stream
        self.frames: list[np.ndarray] = []
        self.levels: list[float] = []
        self.voiced: list[bool] = []

    def add(self, frame: np.ndarray, level: float, voiced: bool) -> None:
        self.frames.append(frame)
        self.levels.append(level)
        self.voiced.append(voiced)

    @property
    def voiced_frames(self) -> int:
        return sum(self.voiced)

    @property
    def last_voiced(self) -> int:
        return max((i for i, v in enumerate(self.voiced) if v), default=-1)

    def segment(self, end: int, *, frame: int, rate: int) -> Segment:
        return Segment(np.concatenate(self.frames[:end]), self.first * frame, rate)

    def tail_from(self, cut: int) -> _Utterance:
        rest = _Utterance(self.first + cut)
        for f, level, v in zip(self.frames[cut:], self.levels[cut:], self.voiced[cut:]):
            rest.add(f, level, v)
        return rest


class EnergyVad:
    """Streaming energy VAD: `push` samples as they come, get the utterances they complete;
    `flush` at the end of the stream for the one still open."""

    def __init__(self, params: VadParams | None = None) -> None:
        self.params = params or VadParams()
        self._reset()

    def _reset(self) -> None:
        p = self.params
        self._framer = _Framer(p.frame)
        self._back, self._ahead = p.frames(p.floor_back_s), p.frames(p.floor_ahead_s)
        # Frames not decided yet (the look-ahead) and the levels the floor looks back on.
        self._pending: collections.deque[tuple[np.ndarray, float]] = collections.deque()
        self._history: collections.deque[float] = collections.deque(maxlen=self._back)
        self._pre_roll: collections.deque[tuple[np.ndarray, float]] = collections.deque(maxlen=p.frames(p.pre_roll_s))
        self._onset: list[tuple[np.ndarray, float]] = []  # loud frames before start_frames is reached
        self._current: _Utterance | None = None
        self._unvoiced = 0
        self._decided = 0  # index of the next frame to decide

    @property
    def in_speech(self) -> bool:
        return self._current is not None

    def push(self, samples: np.ndarray) -> list[Segment]:
        out: list[Segment] = []
        p = self.params
        for frame in self._framer.push(samples):
            # One frame per call: a batched FFT may round differently, and the cuts must not
            # depend on how the stream was blocked.
            level = float(frame_levels(frame, frame=p.frame, rate=p.sample_rate, band_hz=p.band_hz)[0])
            self._pending.append((frame, level))
            if len(self._pending) > self._ahead:
                self._decide_one(out)
        return out

    def flush(self) -> list[Segment]:
        """Decide the look-ahead frames, close the open utterance, and reset for a new stream."""
        out: list[Segment] = []
        while self._pending:
            self._decide_one(out)
        rest = self._framer.rest()
        if self._current is not None:
            if len(rest):  # the partial last frame belongs to an utterance that runs to the end
                self._current.add(rest, _DIGITAL_SILENCE_DBFS, voiced=False)
            self._close(out)
        self._reset()
        return out

    # --- one frame ---------------------------------------------------------------------------
    def _floor(self) -> float:
        ahead = min(level for _, level in self._pending)
        back = min(self._history) if self._history else ahead
        return max(min(back, ahead), _DIGITAL_SILENCE_DBFS)

    def _decide_one(self, out: list[Segment]) -> None:
        p = self.params
        floor = self._floor()
        frame, level = self._pending.popleft()
        self._history.append(level)
        index = self._decided
        self._decided += 1
        loud = level >= p.min_level_dbfs and level >= floor + p.start_db
        voiced = level >= p.min_level_dbfs and level >= floor + p.stop_db
        if self._current is None:
            if loud:
                self._onset.append((frame, level))
                if len(self._onset) >= p.start_frames:
                    self._open(index + 1 - len(self._onset))
            else:
                self._pre_roll.extend(self._onset)
                self._onset.clear()
                self._pre_roll.append((frame, level))
            return
        cur = self._current
        cur.add(frame, level, voiced)
        self._unvoiced = 0 if voiced else self._unvoiced + 1
        if self._unvoiced >= p.frames(p.hangover_s):
            self._close(out)
        elif len(cur.frames) >= p.max_frames:
            self._split(out)

    def _open(self, onset_index: int) -> None:
        pre = list(self._pre_roll)
        cur = _Utterance(onset_index - len(pre))
        for f, level in pre:
            cur.add(f, level, voiced=False)
        for f, level in self._onset:
            cur.add(f, level, voiced=True)
        self._pre_roll.clear()
        self._onset.clear()
        self._current, self._unvoiced = cur, 0

    def _close(self, out: list[Segment]) -> None:
        p = self.params
        cur, self._current = self._current, None
        self._unvoiced = 0
        if cur is None:
            return
        end = 0  # a click or a cough: nothing emitted
        if cur.voiced_frames >= p.frames(p.min_speech_s):
            end = min(len(cur.frames), cur.last_voiced + 1 + p.frames(p.tail_s))
            out.append(cur.segment(end, frame=p.frame, rate=p.sample_rate))
        # What was not emitted is the most recent audio: the next utterance's pre-roll starts
        # there (after a short pause its soft first consonant lies in it).
        self._pre_roll.extend(zip(cur.frames[end:], cur.levels[end:]))

    def _split(self, out: list[Segment]) -> None:
        """At max_frames: emit up to the quietest recent frame, keep the rest open."""
        p = self.params
        cur = self._current
        n = len(cur.frames)
        cut = min(max(quietest_cut(np.asarray(cur.levels), n - p.frames(p.split_search_s), n), 1), n - 1)
        out.append(cur.segment(cut, frame=p.frame, rate=p.sample_rate))
        self._current = cur.tail_from(cut)


class PushToTalk:
    """Utterances are what is heard while talking is on (Enter toggles it in the CLI).

    `set_talking` may be called from another thread; it takes effect at the next push.
    Speech held longer than max_seconds is cut at its quietest moment, like EnergyVad.
    """

    def __init__(self, params: VadParams | None = None) -> None:
        self.params = params or VadParams()
        self._talking = False
        self._buffer: list[np.ndarray] = []
        self._start = 0
        self._position = 0  # samples seen

    def set_talking(self, on: bool) -> None:
        self._talking = bool(on)

    @property
    def talking(self) -> bool:
        return self._talking

    def push(self, samples: np.ndarray) -> list[Segment]:
        x = np.asarray(samples, np.float32).reshape(-1)
        out: list[Segment] = []
        if self._talking:
            if not self._buffer:
                self._start = self._position
            self._buffer.append(x)
            held = sum(len(b) for b in self._buffer)
            if held > int(self.params.max_seconds * self.params.sample_rate):
                pieces = self._pieces()
                out += pieces[:-1]
                self._buffer, self._start = [pieces[-1].audio], pieces[-1].start
        elif self._buffer:
            out += self._pieces()
            self._buffer = []
        self._position += len(x)
        return out

    def flush(self) -> list[Segment]:
        out = self._pieces() if self._buffer else []
        self._buffer = []
        return out

    def _pieces(self) -> list[Segment]:
        p = self.params
        audio = np.concatenate(self._buffer)
        return [Segment(s.audio, self._start + s.start, p.sample_rate)
                for s in split_long(audio, p.sample_rate, max_seconds=p.max_seconds,
                                    search_seconds=p.split_search_s, frame_ms=p.frame_ms)]


def segment_waveform(waveform: np.ndarray, *, params: VadParams | None = None) -> list[Segment]:
    """All utterances of a recorded clip: the same cuts the microphone path makes."""
    vad = EnergyVad(params)
    return vad.push(waveform) + vad.flush()


__all__ = ["EnergyVad", "PushToTalk", "Segment", "VadParams", "frame_levels", "quietest_cut", "segment_waveform",
           "split_long"]
