"""`edgekit translate`: CPU unit tests, then end-to-end runs on a tiny pi5 bundle.

Tier 1, CPU unit tests (fast, no bundle): the language table, the prompt, the streaming
parser under every way of cutting an answer into pieces, the energy VAD on synthetic
silence / noise / clicks / speech-like signals and on real speech, the file splitter,
push-to-talk, the stream resampler, and the microphone through a fake `sounddevice`
module (its InputStream feeds a WAV to the callback in blocks, with silence between the
utterances): the same utterances as from the file, none dropped, overflow reported.

Tier 2, end to end (one ONNX pi5 export of the tiny-e2b checkpoint, fp32, shared with
the other runtime tests; plus a text-only export of a 2-layer tiny-e2b for the no-audio
error, made in the background meanwhile): the pipeline from a WAV, the answer parsed into its two fields,
audio reaching the decoder (the answer changes with the audio), `--mic` printing what
`--wav` prints, and every bad input failing in one line without a traceback.

Speech is real: espeak-ng synthesizes an English and a German sentence when it is
installed (CI installs it), else the committed tests/assets/speech_*.wav are used.
About 2.5 minutes, most of it the two exports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import InputError, MissingDependencyError
from edgekit.apps.translate.microphone import Microphone, StreamResampler, find_input_device, import_sounddevice
from edgekit.apps.translate.loop import (LANGUAGES, Piece, TranslationParser, Utterance, find_language,
                                        translate_utterance, translation_prompt)
from edgekit.apps.translate.vad import (EnergyVad, PushToTalk, VadParams, frame_levels, segment_waveform,
                                  split_long)
from edgekit.runtimes.wav_io import load_audio, resample
from tests.conftest import assert_clean_failure, run_cli

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
RATE = 16_000
SENTENCES = {  # tests/assets/README.md says how the fallback files were made from these
    "en": ("en-us", "The train to the airport leaves from platform four at nine thirty."),
    "de": ("de", "Der Zug zum Flughafen fährt um halb zehn von Gleis vier ab."),
}
SAMPLE = ("--temperature", "1", "--seed", "0", "--max-new-tokens", "12")  # random weights: greedy says nothing


# --- audio helpers -------------------------------------------------------------------------


def write_wav(path: Path, x: np.ndarray, rate: int = RATE) -> Path:
    """16-bit PCM; x is [frames] or [frames, channels] in [-1, 1]."""
    x = np.asarray(x, np.float32)
    channels = 1 if x.ndim == 1 else x.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def noise(seconds: float, dbfs: float, *, seed: int = 0, color: str = "white") -> np.ndarray:
    """White, pink (1/f: fans, rain) or brown (1/f^2: traffic, rumble) noise at an RMS level."""
    n = int(seconds * RATE)
    x = np.random.default_rng(seed).standard_normal(n)
    if color != "white":
        spectrum, f = np.fft.rfft(x), np.fft.rfftfreq(n, 1 / RATE)
        f[0] = f[1]
        x = np.fft.irfft(spectrum / f ** ({"pink": 0.5, "brown": 1.0}[color]), n)
    return (x / np.sqrt(np.mean(x * x)) * 10 ** (dbfs / 20)).astype(np.float32)


def syllables(seconds: float, *, dbfs: float = -20.0, f0: float = 130.0, rate_hz: float = 4.0) -> np.ndarray:
    """Speech-like: a voiced harmonic tone whose loudness rises and falls 4 times a second."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12))
    envelope = 0.55 - 0.45 * np.cos(2 * np.pi * rate_hz * t)
    x = tone * envelope
    return (x / np.sqrt(np.mean(x * x)) * 10 ** (dbfs / 20)).astype(np.float32)


def covers(segment, start: int, end: int) -> bool:
    return segment.start <= start and segment.start + len(segment.audio) >= end


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    """An English and a German sentence as WAV files (espeak-ng writes 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        return {lang: ASSETS / f"speech_{lang}.wav" for lang in SENTENCES}
    out = tmp_path_factory.mktemp("speech")
    for lang, (voice, text) in SENTENCES.items():
        subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(out / f"{lang}.wav"), text], check=True,
                       capture_output=True)
    return {lang: out / f"{lang}.wav" for lang in SENTENCES}


@pytest.fixture(scope="module")
def waves(speech) -> dict[str, np.ndarray]:
    return {lang: load_audio(path) for lang, path in speech.items()}


@pytest.fixture(scope="module")
def conversation(waves) -> np.ndarray:
    """English, German, English with 1.5 s of silence around each: three utterances."""
    gap = silence(1.5)
    return np.concatenate([gap, waves["en"], gap, waves["de"], gap, waves["en"], gap])


# --- languages and prompt ------------------------------------------------------------------


def test_languages_resolve_by_name_code_and_endonym():
    assert find_language("Japanese") is find_language("ja") is find_language("日本語") is find_language(" JAPANESE ")
    assert find_language("de").name == "German"
    assert len({lang.code for lang in LANGUAGES}) == len(LANGUAGES)
    with pytest.raises(InputError, match=r"unknown language 'Klingon'.*Japanese \(ja\).*--list-languages"):
        find_language("Klingon")


def test_prompt_asks_for_the_parseable_shape():
    en, ja = find_language("en"), find_language("ja")
    prompt = translation_prompt(source=en, target=ja)
    assert prompt.startswith("Transcribe the following speech segment in English, then translate it into Japanese.")
    assert "first output the transcription in English, then one newline, then output the string 'Japanese: '" in prompt
    assert "in English" not in translation_prompt(source=None, target=ja)


# --- streaming parser ----------------------------------------------------------------------


def _parse(text: str, cuts: list[int]) -> tuple[str, str]:
    parser = TranslationParser(find_language("Japanese"))
    pieces, last = [], 0
    for cut in [*cuts, len(text)]:
        pieces += parser.push(text[last:cut])
        last = cut
    pieces += parser.finish()
    assert all(isinstance(p, Piece) and p.text for p in pieces)
    fields = [p.field for p in pieces]
    assert fields == sorted(fields, key=["source", "translation"].index)  # never back to source
    return ("".join(p.text for p in pieces if p.field == "source"),
            "".join(p.text for p in pieces if p.field == "translation"))


@pytest.mark.parametrize("answer, expected", [
    ("The train leaves at 9:30.\nJapanese: 電車は9時30分に出ます。", ("The train leaves at 9:30.", "電車は9時30分に出ます。")),
    ("no newline, no marker: all transcription", ("no newline, no marker: all transcription", "")),
    ("line one\nline two", ("line one\nline two", "")),  # a newline that is not the marker
    ("A\nJapanese rice is good\nJapanese: B", ("A\nJapanese rice is good", "B")),
    ("  A \n\n japanese :  B\nC", ("A ", "B\nC")),
    ("A\nJapan", ("A\nJapan", "")),  # a marker cut short by the end of the answer
    ("A\nJapanese:", ("A", "")),
    ("", ("", "")),
])
def test_parser_splits_the_same_however_the_answer_streams(answer, expected):
    rng = np.random.default_rng(0)
    assert _parse(answer, []) == expected
    assert _parse(answer, list(range(1, len(answer)))) == expected  # one character at a time
    for _ in range(50):
        cuts = sorted(rng.choice(np.arange(1, max(len(answer), 2)), size=min(3, max(len(answer) - 1, 0)),
                                 replace=False).tolist()) if len(answer) > 1 else []
        assert _parse(answer, cuts) == expected


def test_parser_prints_transcription_before_the_marker_is_complete():
    parser = TranslationParser(find_language("Japanese"))
    assert parser.push("Hello") == [Piece("source", "Hello")]
    assert parser.push(" there\nJap") == [Piece("source", " there")]  # "\nJap" may be the marker: held
    assert parser.push("anese: こん") == [Piece("translation", "こん")]
    assert parser.push("にちは") == [Piece("translation", "にちは")]


# --- VAD on synthetic signals --------------------------------------------------------------


@pytest.mark.parametrize("signal", [
    silence(5), noise(5, -70), noise(10, -20), noise(10, -25, color="pink"), noise(10, -25, color="brown"),
], ids=["digital-silence", "quiet-room", "loud-white-noise", "pink-noise", "brown-noise"])
def test_vad_hears_no_speech_in_silence_or_stationary_noise(signal):
    assert segment_waveform(signal) == []


def test_vad_ignores_clicks():
    x = noise(6, -65)
    for second in range(1, 6):
        x[second * RATE: second * RATE + 320] += noise(0.02, -6, seed=second)  # 20 ms door knocks
    assert segment_waveform(x) == []


@pytest.mark.parametrize("background_dbfs", [None, -60.0, -35.0], ids=["clean", "quiet-room", "snr-15db"])
def test_vad_cuts_speech_bursts_at_pauses(background_dbfs):
    bursts = [(1.0, 2.2), (4.0, 6.5), (8.0, 9.0)]  # seconds
    x = silence(11)
    for begin, end in bursts:
        x[int(begin * RATE): int(begin * RATE) + int((end - begin) * RATE)] = syllables(end - begin)
    if background_dbfs is not None:
        x = x + noise(11, background_dbfs, seed=1)
    segments = segment_waveform(x)
    assert len(segments) == len(bursts)
    for segment, (begin, end) in zip(segments, bursts):
        assert covers(segment, int(begin * RATE) + 160, int(end * RATE) - 160), (segment.start_s, segment.seconds)
        assert segment.seconds < (end - begin) + 1.0  # pre-roll + tail, not the whole pause


def test_vad_keeps_the_pre_roll_after_a_short_pause():
    """A pause shorter than hangover + pre-roll: the second utterance still starts a full
    pre-roll before its onset (that audio was part of the first one's hangover, not emitted)."""
    x = silence(5)
    x[1 * RATE: 2 * RATE] = syllables(1.0)
    onset = 2.75  # 0.75 s pause: the first utterance closes 0.7 s after its last voiced frame
    x[int(onset * RATE): int(onset * RATE) + RATE] = syllables(1.0)
    first, second = segment_waveform(x)
    pre_roll = VadParams().pre_roll_s
    assert second.start_s <= onset - pre_roll + 0.03 + 1e-9, second.start_s
    assert first.start_s + first.seconds <= second.start_s  # no sample twice


def test_vad_on_real_speech_gives_one_utterance_per_sentence(waves, conversation):
    segments = segment_waveform(conversation)
    assert len(segments) == 3
    starts = np.cumsum([int(1.5 * RATE), len(waves["en"]) + int(1.5 * RATE), len(waves["de"]) + int(1.5 * RATE)])
    for segment, start, lang in zip(segments, starts, ["en", "de", "en"]):
        voiced = np.flatnonzero(frame_levels(waves[lang], frame=480, rate=RATE) > -45)
        assert covers(segment, start + voiced[0] * 480, start + (voiced[-1] + 1) * 480)
    # A file that starts with speech straight away loses nothing at its start.
    assert segment_waveform(waves["en"])[0].start == 0


def test_vad_is_the_same_whatever_the_block_size(conversation):
    reference = segment_waveform(conversation)
    rng = np.random.default_rng(0)
    vad, got, at = EnergyVad(), [], 0
    while at < len(conversation):
        n = int(rng.integers(1, 5000))
        got += vad.push(conversation[at: at + n])
        at += n
    got += vad.flush()
    assert [(s.start, len(s.audio)) for s in got] == [(s.start, len(s.audio)) for s in reference]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(got, reference))


def _phrases(seconds: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Continuous speech-like audio: 1.3..2.9 s phrases, 0.35 s breaths (shorter than the hang-over)."""
    rng, parts, gaps, at = np.random.default_rng(3), [], [], 0
    while at < seconds * RATE:
        phrase = syllables(float(rng.uniform(1.3, 2.9)), f0=float(rng.uniform(100, 200)))
        parts += [phrase, silence(0.35)]
        at += len(phrase)
        gaps.append((at, at + int(0.35 * RATE)))
        at += int(0.35 * RATE)
    return np.concatenate(parts), gaps


def test_vad_splits_speech_longer_than_30_s_in_a_breath():
    x, gaps = _phrases(70)
    segments = segment_waveform(x)
    assert len(segments) >= 3
    assert all(s.seconds <= 30.0 for s in segments)
    for a, b in zip(segments, segments[1:]):
        assert a.start + len(a.audio) == b.start  # forced cuts are seamless: nothing dropped
        assert any(lo - 480 <= b.start <= hi + 480 for lo, hi in gaps), b.start_s  # ... and in a breath


def test_split_long_keeps_every_sample_and_cuts_in_pauses():
    x, gaps = _phrases(65)
    pieces = split_long(x, RATE)
    assert len(pieces) == 3 and all(p.seconds <= 30.0 for p in pieces)
    assert np.array_equal(np.concatenate([p.audio for p in pieces]), x)
    assert [p.start for p in pieces] == [0, len(pieces[0].audio), len(pieces[0].audio) + len(pieces[1].audio)]
    assert all(any(lo - 480 <= p.start <= hi + 480 for lo, hi in gaps) for p in pieces[1:])
    short = syllables(3)
    (whole,) = split_long(short, RATE)
    assert whole.start == 0 and np.array_equal(whole.audio, short)


def test_push_to_talk_takes_exactly_what_is_held():
    ptt, x = PushToTalk(), syllables(40)
    assert ptt.push(x[:RATE]) == []  # not talking: nothing kept
    ptt.set_talking(True)
    held = []
    for i in range(RATE, 36 * RATE, 1600):
        held += ptt.push(x[i:i + 1600])
    ptt.set_talking(False)
    held += ptt.push(x[36 * RATE: 36 * RATE + 1600])
    assert len(held) == 2 and all(s.seconds <= 30 for s in held)
    assert np.array_equal(np.concatenate([s.audio for s in held]), x[RATE: 36 * RATE])
    assert held[0].start == RATE


# --- microphone through a fake sounddevice --------------------------------------------------


class FakeSoundDevice(types.ModuleType):
    """The sounddevice API edgekit uses. The stream plays `audio` to the callback in blocks,
    then `after_s` of silence (a quiet room), then stops as an unplugged device would."""

    class PortAudioError(Exception):
        pass

    def __init__(self, audio: np.ndarray, *, audio_rate: int = RATE, device_rate: int = RATE, mono: bool = True,
                 after_s: float = 1.0, has_input: bool = True) -> None:
        super().__init__("sounddevice")
        self.audio, self.audio_rate, self.device_rate = audio, audio_rate, device_rate
        self.mono, self.after_s, self.has_input = mono, after_s, has_input
        self.opened: dict = {}

    def query_devices(self, device=None, kind=None):
        if not self.has_input:
            raise self.PortAudioError("Error querying device -1")
        return {"name": "Fake USB Microphone", "max_input_channels": 2, "default_samplerate": float(self.device_rate)}

    def check_input_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        if samplerate != self.device_rate or (channels == 1 and not self.mono):
            raise self.PortAudioError("Invalid sample rate" if samplerate != self.device_rate else "Invalid channels")

    def InputStream(self, **kwargs):  # noqa: N802 (sounddevice's name)
        self.opened = kwargs
        return _FakeStream(self, **kwargs)


class _FakeStream:
    def __init__(self, sd: FakeSoundDevice, *, samplerate, channels, dtype, device, blocksize, callback,
                 finished_callback) -> None:
        self.sd, self.rate, self.channels, self.block = sd, samplerate, channels, blocksize
        self.callback, self.finished = callback, finished_callback
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._play, daemon=True).start()

    def _play(self) -> None:
        x = self.sd.audio
        if self.rate != self.sd.audio_rate:
            x = resample(x, self.sd.audio_rate, self.rate)
        x = np.concatenate([x, np.zeros(int(self.sd.after_s * self.rate), np.float32)])
        for i in range(0, len(x), self.block):
            if self.stopped.is_set():
                return
            block = np.repeat(x[i:i + self.block, None], self.channels, axis=1)
            self.callback(block, len(block), None, None)
            time.sleep(0.001)  # a real device paces the blocks; this one runs ~100x real time
        self.finished()

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        pass


def _listen(sd, **options) -> tuple[list, list[str], Microphone]:
    notices: list[str] = []
    with Microphone(segmenter=options.pop("segmenter", EnergyVad()), sd=sd, on_notice=notices.append,
                    **options) as mic:
        got = list(mic.utterances())
    return got, notices, mic


def test_microphone_gives_the_utterances_of_the_file_none_dropped(conversation):
    got, notices, mic = _listen(FakeSoundDevice(conversation), duration_s=len(conversation) / RATE)
    reference = segment_waveform(conversation)
    assert len(got) == len(reference) == 3
    assert all(a.start == b.start and np.array_equal(a.audio, b.audio) for a, b in zip(got, reference))
    assert notices == [] and mic.stats.dropped_s == 0 and not mic.stopped_by_device


def test_microphone_resamples_a_44k_stereo_device(conversation):
    sd = FakeSoundDevice(conversation, device_rate=44_100, mono=False)
    got, notices, mic = _listen(sd)
    assert sd.opened["samplerate"] == 44_100 and sd.opened["channels"] == 2
    reference = segment_waveform(conversation)
    assert len(got) == len(reference) and notices == []
    assert all(abs(a.start - b.start) <= 2 * 480 and abs(len(a.audio) - len(b.audio)) <= 4 * 480
               for a, b in zip(got, reference))
    assert mic.stopped_by_device  # the fake stream ended on its own, unlike a --duration stop


def test_microphone_keeps_listening_while_the_caller_is_busy(conversation):
    slow: list = []
    with Microphone(segmenter=EnergyVad(), sd=FakeSoundDevice(conversation), on_notice=slow.append) as mic:
        for segment in mic.utterances():
            time.sleep(0.3)  # "translating"; capture goes on meanwhile
            slow.append(segment)
    assert len(slow) == 3 and mic.stats.dropped_s == 0


def test_microphone_tells_when_its_queue_overflows(conversation):
    notices: list[str] = []
    with Microphone(segmenter=EnergyVad(), sd=FakeSoundDevice(conversation), on_notice=notices.append,
                    max_pending=1) as mic:
        time.sleep(1.0)  # the caller is stuck on something: all three utterances arrive meanwhile
        got = list(mic.utterances())
    assert len(got) == 1 and len(notices) == 2
    assert all("translation is falling behind: dropped the" in n for n in notices)
    assert got[0].start == segment_waveform(conversation)[-1].start  # the newest is kept
    assert mic.stats.dropped_s > 8


def test_microphone_errors_say_what_to_install_or_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'gemma-edgekit\[audio\]'"):
        import_sounddevice()
    with pytest.raises(InputError, match=r"no microphone.*python -m sounddevice"):
        find_input_device(FakeSoundDevice(silence(1), has_input=False), None, rate=RATE)


def test_portaudio_failing_to_start_is_a_clear_error(monkeypatch):
    """sounddevice initialises PortAudio on import; its PortAudioError (no sound server, a
    broken ALSA config) is a one-line NotAvailableError, not an internal error."""
    from edgekit.errors import NotAvailableError

    class PortAudioError(Exception):
        pass

    class FailingImport:  # what `import sounddevice` does when Pa_Initialize fails
        def find_spec(self, name, path=None, target=None):
            if name == "sounddevice":
                raise PortAudioError("Error querying host APIs")
            return None

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingImport(), *sys.meta_path])
    with pytest.raises(NotAvailableError, match="PortAudio could not start.*python -m sounddevice"):
        import_sounddevice()


@pytest.mark.parametrize("src", [44_100, 48_000, 8_000, 22_050])
def test_stream_resampler_matches_resampling_the_whole_stream(src):
    x = np.random.default_rng(src).standard_normal(src * 2).astype(np.float32)
    r = StreamResampler(src, RATE)
    blocks = [r.push(x[i:i + 1111]) for i in range(0, len(x), 1111)] + [r.flush()]
    np.testing.assert_allclose(np.concatenate(blocks), resample(x, src, RATE), atol=1e-6)


# --- end to end on a tiny pi5 bundle --------------------------------------------------------


class _Background(threading.Thread):
    """Commands run one after another in a thread, each a fresh `python -m edgekit`."""

    def __init__(self, *commands: list[str]) -> None:
        super().__init__(daemon=True)
        self.commands, self.failure = commands, None
        self.procs: list[subprocess.Popen] = []

    def run(self) -> None:
        for command in self.commands:
            proc = subprocess.Popen([sys.executable, "-m", "edgekit", *command], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.procs.append(proc)
            _, stderr = proc.communicate()
            if proc.returncode != 0:
                self.failure = f"edgekit {' '.join(command)}: {stderr}"
                return


@pytest.fixture(scope="module")
def _no_audio_export(tmp_path_factory):
    """A text-only bundle of a 2-layer tiny-e2b (about 25 s), made in the background while
    the main bundle exports."""
    work = tmp_path_factory.mktemp("no-audio")
    out = work / "tiny-e2b-text.edgekit"
    job = _Background(["make-checkpoint", "tiny-e2b", str(work / "ckpt"), "--layers", "2"],
                      ["export", str(work / "ckpt"), "--device", "pi5-8gb", "--quant", "fp32", "--modalities", "text",
                       "-o", str(out)])
    job.start()
    yield job, out
    for proc in job.procs:
        if proc.poll() is None:
            proc.kill()
    job.join(timeout=30)


@pytest.fixture(scope="module")
def pi5_bundle(_no_audio_export, onnx_fp32_bundle) -> Path:
    """tiny-e2b exported for pi5-8gb in fp32 with every modality (conftest's shared export)."""
    return onnx_fp32_bundle


@pytest.fixture(scope="module")
def no_audio_bundle(_no_audio_export) -> Path:
    job, out = _no_audio_export
    job.join(timeout=900)
    assert job.failure is None, job.failure
    assert not job.is_alive()
    return out


@pytest.fixture(scope="module")
def engine(pi5_bundle):
    from edgekit.runtimes.engine import Engine

    return Engine.open(pi5_bundle)


def _translate(engine, waveform, **kwargs) -> tuple[list[Piece], Utterance]:
    from edgekit.runtimes.sampling import SamplingParams

    sampling = SamplingParams(temperature=1.0, seed=0, max_new_tokens=12)
    events = list(translate_utterance(engine, waveform, source=find_language("en"), target=find_language("ja"),
                                      sampling=sampling, **kwargs))
    assert all(isinstance(e, Piece) for e in events[:-1]) and isinstance(events[-1], Utterance)
    return events[:-1], events[-1]


def test_pipeline_parses_random_weight_output_and_hears_the_audio(engine, waves):
    from edgekit.runtimes.mel_features import num_audio_tokens

    pieces, en = _translate(engine, waves["en"])
    _, de = _translate(engine, waves["de"])
    _, en_again = _translate(engine, waves["en"])
    # No "\nJapanese: " in random-weight output: everything is transcription.
    assert en.source_text and en.translation == "" and {p.field for p in pieces} == {"source"}
    assert en.source_text == "".join(p.text for p in pieces).strip()
    # The audio reaches the decoder: its soft tokens fill the prompt, and other audio gives other text.
    assert de.timings["prompt_tokens"] - en.timings["prompt_tokens"] == \
        num_audio_tokens(len(waves["de"])) - num_audio_tokens(len(waves["en"]))
    assert de.source_text != en.source_text
    assert en_again.source_text == en.source_text  # a fresh cache each time: same audio, same answer
    assert en.audio_s == pytest.approx(len(waves["en"]) / RATE)
    for key in ("audio_encode_s", "prefill_tok_s", "decode_tok_s", "real_time_factor", "time_to_first_token_s"):
        assert en.timings[key] > 0, key


def test_marker_splits_the_answer_into_its_two_fields(engine, waves):
    class ScriptedEngine:  # the real bundle's manifest, a scripted answer
        bundle, last_stats = engine.bundle, engine.last_stats

        def reset(self):
            pass

        def generate(self, messages, **_):
            assert messages[0]["content"][0]["type"] == "audio"
            yield from ["The train", " leaves.\nJapa", "nese: 電車", "が出ます。"]

    pieces, result = _translate(ScriptedEngine(), waves["en"])
    assert [p.field for p in pieces] == ["source", "source", "translation", "translation"]
    assert (result.source_text, result.translation) == ("The train leaves.", "電車が出ます。")
    assert json.loads(json.dumps(result.to_dict()))["translation"] == "電車が出ます。"


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_cli_translates_a_wav_with_json_and_stats(pi5_bundle, speech):
    result = run_cli("translate", str(pi5_bundle), "--to", "Japanese", "--from", "English", "--wav",
                     str(speech["en"]), "--json", "--stats", *SAMPLE)
    assert result.returncode == 0, result.stderr
    (record,) = _json_lines(result.stdout)
    assert record["source_language"] == "English" and record["target_language"] == "Japanese"
    assert record["source_text"] and record["translation"] == ""
    assert {"audio_encode_s", "prefill_tok_s", "decode_tok_s", "real_time_factor"} <= set(record["timings"])
    assert "[1] audio " in result.stderr and " RTF " in result.stderr and "decode" in result.stderr

    human = run_cli("translate", str(pi5_bundle), "--to", "ja", "--from", "en", "--wav", str(speech["en"]), *SAMPLE)
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("English: ") and human.stdout.rstrip("\n") == f"English: {record['source_text']}"


def _convert(src: Path, dst: Path, *, rate: int | None = None, channels: int | None = None) -> Path:
    if shutil.which("sox"):
        args = (["-r", str(rate)] if rate else []) + (["-c", str(channels)] if channels else [])
        subprocess.run(["sox", str(src), *args, str(dst)], check=True, capture_output=True)
        return dst
    x = load_audio(src)
    x = resample(x, RATE, rate) if rate else x
    return write_wav(dst, np.stack([x] * channels, axis=1) if channels else x, rate or RATE)


@pytest.mark.parametrize("kind", ["8khz", "stereo"])
def test_cli_resamples_and_mixes_down(pi5_bundle, speech, tmp_path, kind):
    path = _convert(speech["en"], tmp_path / f"{kind}.wav", **({"rate": 8000} if kind == "8khz" else {"channels": 2}))
    result = run_cli("translate", str(pi5_bundle), "--to", "ja", "--wav", str(path), "--json", *SAMPLE)
    assert result.returncode == 0, result.stderr
    (record,) = _json_lines(result.stdout)
    assert record["source_text"] and record["audio_s"] <= load_audio(speech["en"]).size / RATE + 0.1


def test_cli_splits_a_60_s_file(pi5_bundle, waves, tmp_path):
    x = np.concatenate([np.concatenate([waves["en"], silence(0.3), waves["de"], silence(0.3)])] * 8)[: 60 * RATE]
    path = write_wav(tmp_path / "long.wav", x)
    for extra in ([], ["--no-vad"]):
        result = run_cli("translate", str(pi5_bundle), "--to", "ja", "--wav", str(path), "--json", *extra,
                         "--max-new-tokens", "2")
        assert result.returncode == 0, result.stderr
        records = _json_lines(result.stdout)
        assert len(records) >= 2 and all(r["audio_s"] <= 30.0 for r in records)
        assert [r["index"] for r in records] == list(range(1, len(records) + 1))
        if extra:  # whole file: the pieces add up to all of it
            assert sum(r["audio_s"] for r in records) == pytest.approx(60.0, abs=0.01)


def test_cli_mic_prints_what_wav_prints(pi5_bundle, conversation, tmp_path, monkeypatch, capsys):
    from edgekit.cli import app

    path = write_wav(tmp_path / "conversation.wav", conversation)
    fed = load_audio(path)  # the very samples --wav reads
    options = ["--to", "ja", "--from", "en", "--json", *SAMPLE]
    app(args=["translate", str(pi5_bundle), "--wav", str(path), *options], prog_name="edgekit", standalone_mode=False)
    from_file = _json_lines(capsys.readouterr().out)

    sd = FakeSoundDevice(fed)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    app(args=["translate", str(pi5_bundle), "--mic", "--duration", str(len(fed) / RATE), *options],
        prog_name="edgekit", standalone_mode=False)
    captured = capsys.readouterr()
    from_mic = _json_lines(captured.out)
    assert sd.opened["samplerate"] == RATE and "listening on Fake USB Microphone" in captured.err
    assert "warning" not in captured.err  # nothing dropped
    keys = ("index", "start_s", "audio_s", "source_text", "translation")
    assert len(from_file) == 3
    assert [{k: r[k] for k in keys} for r in from_mic] == [{k: r[k] for k in keys} for r in from_file]
    assert from_file[0]["source_text"] != from_file[1]["source_text"]  # English and German audio differ


# --- bad input: one line on stderr, non-zero exit, no traceback ----------------------------


def _fake_sounddevice_module(tmp_path: Path, body: str) -> dict:
    (tmp_path / "fake_sd").mkdir()
    (tmp_path / "fake_sd" / "sounddevice.py").write_text(body)
    return {"PYTHONPATH": str(tmp_path / "fake_sd")}


def test_bad_inputs_fail_in_one_line(pi5_bundle, speech, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are meeting notes, not audio\n")
    no_speech = write_wav(tmp_path / "hiss.wav", noise(3, -25))
    cases = [
        (["--to", "ja", "--wav", str(not_audio)], 2, "is not a WAV file"),
        (["--to", "ja", "--wav", str(no_speech)], 2, "no speech found"),
        (["--to", "ja", "--wav", str(tmp_path / "missing.wav")], 2, "does not exist"),
        (["--to", "Klingon", "--wav", str(speech["en"])], 2, "unknown language 'Klingon'"),
        (["--to", "ja"], 2, "give one input: --wav FILE or --mic"),
        (["--to", "ja", "--wav", str(speech["en"]), "--mic"], 2, "give one input"),
        (["--to", "en", "--from", "English", "--wav", str(speech["en"])], 2, "both English"),
    ]
    for args, code, message in cases:
        result = run_cli("translate", str(pi5_bundle), *args)
        assert_clean_failure(result, code=code, contains=message)
    unknown = run_cli("translate", str(pi5_bundle), "--to", "Klingon", "--wav", str(speech["en"]))
    assert "Japanese (ja)" in unknown.stderr and "--list-languages" in unknown.stderr


def test_bundle_without_audio_encoder_says_how_to_export(no_audio_bundle, speech):
    result = run_cli("translate", str(no_audio_bundle), "--to", "ja", "--wav", str(speech["en"]))
    assert_clean_failure(result, code=2, contains="has no audio encoder")
    assert "--device pi5-8gb --modalities text,audio" in result.stderr


def test_mic_without_portaudio_says_what_to_install_and_wav_still_works(pi5_bundle, speech, tmp_path):
    env = _fake_sounddevice_module(tmp_path, "raise OSError('PortAudio library not found')\n")
    result = run_cli("translate", str(pi5_bundle), "--to", "ja", "--mic", env=env)
    assert_clean_failure(result, code=10, contains="apt install libportaudio2")
    assert "python -m sounddevice" in result.stderr
    works = run_cli("translate", str(pi5_bundle), "--to", "ja", "--wav", str(speech["de"]), *SAMPLE, env=env)
    assert works.returncode == 0, works.stderr


def test_mic_without_an_input_device_says_where_to_look(pi5_bundle, tmp_path):
    env = _fake_sounddevice_module(tmp_path, (
        "class PortAudioError(Exception):\n    pass\n"
        "def query_devices(device=None, kind=None):\n    raise PortAudioError('Error querying device -1')\n"))
    result = run_cli("translate", str(pi5_bundle), "--to", "ja", "--mic", env=env)
    assert_clean_failure(result, code=2, contains="no microphone")
    assert "python -m sounddevice" in result.stderr
