"""Offline speech translation: one utterance in, its transcription and translation out, streamed.

Gemma 4 transcribes and translates in one pass when asked in the shape of its audio
prompts (ai.google.dev/gemma/docs/capabilities/audio): the answer is the transcription,
one newline, the target language's name and ": ", then the translation.

    waveform (16 kHz mono, <= 30 s) ─► [audio part + translation_prompt()] ─► Engine.generate
        pieces "The tra" "in\\nJapa" "nese: 空港" ... ─► TranslationParser ─► (field, text) events
        ("source", "The tra") ("source", "in") ("translation", "空港") ...  ─► Utterance

The parser holds back only what might still turn out to be the "\\n{TARGET}:" marker, so
text is printed as it arrives. An answer without the marker (a model with random weights,
or one that ignored the format) is all transcription and an empty translation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgekit.errors import EdgekitError, InputError
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_VISION_ENCODER, Manifest
from edgekit.profiles import load_profiles

Field = Literal["source", "translation"]

# --- languages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Language:
    """A language the prompt can name: its English name goes into the prompt."""

    code: str  # ISO 639-1
    name: str  # English name, as the prompt says it
    aliases: tuple[str, ...] = ()  # endonyms and other spellings users type


# The languages Gemma's model card reports speech results for (FLEURS / CoVoST) and the
# most spoken others; Gemma 4 was trained on many more, which a user can still add here.
LANGUAGES: tuple[Language, ...] = (
    Language("ar", "Arabic", ("العربية",)),
    Language("bn", "Bengali", ("বাংলা", "bangla")),
    Language("bg", "Bulgarian", ("български",)),
    Language("ca", "Catalan", ("català",)),
    Language("zh", "Chinese", ("中文", "mandarin", "chinese (simplified)", "zh-cn")),
    Language("hr", "Croatian", ("hrvatski",)),
    Language("cs", "Czech", ("čeština",)),
    Language("da", "Danish", ("dansk",)),
    Language("nl", "Dutch", ("nederlands",)),
    Language("en", "English", ()),
    Language("et", "Estonian", ("eesti",)),
    Language("fil", "Filipino", ("tagalog", "tl")),
    Language("fi", "Finnish", ("suomi",)),
    Language("fr", "French", ("français",)),
    Language("de", "German", ("deutsch",)),
    Language("el", "Greek", ("ελληνικά",)),
    Language("gu", "Gujarati", ("ગુજરાતી",)),
    Language("he", "Hebrew", ("עברית", "iw")),
    Language("hi", "Hindi", ("हिन्दी",)),
    Language("hu", "Hungarian", ("magyar",)),
    Language("id", "Indonesian", ("bahasa indonesia",)),
    Language("it", "Italian", ("italiano",)),
    Language("ja", "Japanese", ("日本語",)),
    Language("kn", "Kannada", ("ಕನ್ನಡ",)),
    Language("ko", "Korean", ("한국어",)),
    Language("lv", "Latvian", ("latviešu",)),
    Language("lt", "Lithuanian", ("lietuvių",)),
    Language("ms", "Malay", ("bahasa melayu",)),
    Language("ml", "Malayalam", ("മലയാളം",)),
    Language("mr", "Marathi", ("मराठी",)),
    Language("no", "Norwegian", ("norsk", "nb", "bokmål")),
    Language("fa", "Persian", ("فارسی", "farsi")),
    Language("pl", "Polish", ("polski",)),
    Language("pt", "Portuguese", ("português",)),
    Language("pa", "Punjabi", ("ਪੰਜਾਬੀ",)),
    Language("ro", "Romanian", ("română",)),
    Language("ru", "Russian", ("русский",)),
    Language("sr", "Serbian", ("српски",)),
    Language("sk", "Slovak", ("slovenčina",)),
    Language("sl", "Slovenian", ("slovenščina",)),
    Language("es", "Spanish", ("español",)),
    Language("sw", "Swahili", ("kiswahili",)),
    Language("sv", "Swedish", ("svenska",)),
    Language("ta", "Tamil", ("தமிழ்",)),
    Language("te", "Telugu", ("తెలుగు",)),
    Language("th", "Thai", ("ไทย",)),
    Language("tr", "Turkish", ("türkçe",)),
    Language("uk", "Ukrainian", ("українська",)),
    Language("ur", "Urdu", ("اردو",)),
    Language("vi", "Vietnamese", ("tiếng việt",)),
)

_EXAMPLES = ("English", "Japanese", "es", "German", "zh", "Hindi")


def _language_index(languages: tuple[Language, ...]) -> dict[str, Language]:
    index: dict[str, Language] = {}
    for lang in languages:
        for key in (lang.code, lang.name, *lang.aliases):
            key = key.casefold()
            if key in index:
                raise ValueError(f"language key {key!r} is used by both {index[key].name} and {lang.name}")
            index[key] = lang
    return index


_BY_KEY = _language_index(LANGUAGES)


def find_language(name: str) -> Language:
    """A language by English name, ISO 639-1 code or endonym, any case ("ja", "Japanese", "日本語")."""
    lang = _BY_KEY.get(" ".join(str(name).split()).casefold())
    if lang is None:
        examples = ", ".join(f"{_BY_KEY[e.casefold()].name} ({_BY_KEY[e.casefold()].code})" for e in _EXAMPLES)
        raise InputError(f"unknown language {name!r}; use an English name or ISO 639-1 code, e.g. {examples} "
                         f"(`edgekit translate --list-languages` shows all {len(LANGUAGES)})")
    return lang


# --- prompt -------------------------------------------------------------------------------------


def translation_prompt(*, source: Language | None, target: Language) -> str:
    """The instruction that follows the audio: transcribe, then translate, in a parseable shape."""
    heard = f"in {source.name}" if source else "in the language it is spoken in"
    transcription = f"the transcription in {source.name}" if source else "the transcription"
    return (
        f"Transcribe the following speech segment {heard}, then translate it into {target.name}.\n"
        f"When formatting the answer, first output {transcription}, then one newline, then output the "
        f"string '{target.name}: ', then the translation in {target.name}.\n"
        "Only output the transcription and the translation, nothing else. Write numbers as digits."
    )


def translation_messages(waveform: np.ndarray, *, source: Language | None, target: Language) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "audio", "audio": np.ascontiguousarray(waveform, dtype=np.float32)},
        {"type": "text", "text": translation_prompt(source=source, target=target)},
    ]}]


# --- streaming parser ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Text of one field as it streams in."""

    field: Field
    text: str


class TranslationParser:
    """Split streamed answer text into transcription and translation pieces.

    The translation starts after the first newline(s) followed by "{TARGET}:" (any case,
    spaces allowed around it). A newline that turns out not to start the marker is
    transcription text. Concatenating the pieces of a field gives the same text however
    the answer was split into pieces.
    """

    def __init__(self, target: Language) -> None:
        self._marker = re.compile(r"\n\s*" + re.escape(target.name) + r"\s*:[ \t]*", re.IGNORECASE)
        self._name = target.name.casefold()
        self._field: Field = "source"
        self._held = ""  # text that may still be the start of the marker
        self._started = {"source": False, "translation": False}

    @property
    def field(self) -> Field:
        return self._field

    def push(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        if self._field == "translation":
            self._emit(out, "translation", text)
            return out
        buf = self._held + text
        self._held = ""
        while buf:
            nl = buf.find("\n")
            if nl < 0:
                self._emit(out, "source", buf)
                break
            self._emit(out, "source", buf[:nl])
            buf = buf[nl:]
            match = self._marker.match(buf)
            if match:  # spaces after the marker may still come: the translation's lstrip drops them
                self._field = "translation"
                self._emit(out, "translation", buf[match.end():])
                break
            if self._could_become_marker(buf):
                self._held = buf  # wait for more text
                break
            self._emit(out, "source", "\n")
            buf = buf[1:]
        return out

    def finish(self) -> list[Piece]:
        """The end of the answer: held text is the translation's start or the transcription's end."""
        out: list[Piece] = []
        held, self._held = self._held, ""
        match = self._marker.match(held)
        if held and match:
            self._field = "translation"
            self._emit(out, "translation", held[match.end():])
        elif held:
            self._emit(out, "source", held)
        return out

    def _could_become_marker(self, buf: str) -> bool:
        """Is `buf` ("\\n...") a prefix of some text the marker matches?"""
        rest = buf.lstrip()
        if not rest:
            return True
        if ":" in rest:
            return False
        word = rest.rstrip().casefold()
        return self._name.startswith(word) if not rest[-1].isspace() else word == self._name

    def _emit(self, out: list[Piece], field_: Field, text: str) -> None:
        if not self._started[field_]:
            text = text.lstrip()  # the model's spacing after "Japanese:" or before the transcription
        if text:
            self._started[field_] = True
            out.append(Piece(field_, text))


# --- one utterance -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Utterance:
    """The result for one utterance; `to_dict` is what `edgekit translate --json` prints."""

    index: int
    start_s: float  # where it starts in the stream or file
    audio_s: float
    source_language: str | None
    target_language: str
    source_text: str
    translation: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio time: below 1 keeps up with live speech."""
        return self.timings.get("real_time_factor", 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start_s": round(self.start_s, 3), "audio_s": round(self.audio_s, 3),
                "source_language": self.source_language, "target_language": self.target_language,
                "source_text": self.source_text, "translation": self.translation, "timings": self.timings}


def check_audio_bundle(manifest: Manifest, *, where: str = "this bundle") -> None:
    """Fail early, and say how to export a bundle that can hear, when the audio tower is missing."""
    if manifest.has_method(METHOD_AUDIO_ENCODER) and manifest.audio_preprocessing is not None:
        return
    modalities = ",".join(["text", "audio"] + (["vision"] if manifest.has_method(METHOD_VISION_ENCODER) else []))
    hint = f"`edgekit export CHECKPOINT --device {manifest.device} --modalities {modalities}`"
    try:
        profile = load_profiles().get(manifest.device)
    except EdgekitError:  # a bundle for a profile this install does not know
        profile = None
    if profile is not None and "audio" in profile.modalities:
        hint += f" (or without --modalities: the {profile.name} profile includes audio)"
    raise InputError(f"{where} has no audio encoder, so it cannot hear; export one with {hint}")


def translate_utterance(engine: Any, waveform: np.ndarray, *, source: Language | None, target: Language,
                        sampling: Any = None, index: int = 1, start_s: float = 0.0) -> Iterator[Piece | Utterance]:
    """Stream the transcription and translation of one utterance as Piece events, then
    yield the finished Utterance (its text, and timings from engine.last_stats).

    `engine` is an edgekit.runtimes.engine.Engine; `waveform` float32 mono at the bundle's
    audio rate, at most 30 s (split longer audio with edgekit.apps.translate.vad first).
    """
    manifest = engine.bundle.manifest
    check_audio_bundle(manifest)
    rate = manifest.audio_preprocessing.sampling_rate
    parser = TranslationParser(target)
    text: dict[Field, list[str]] = {"source": [], "translation": []}
    started = time.perf_counter()
    for chunk in engine.generate(translation_messages(waveform, source=source, target=target), sampling=sampling,
                                 enable_thinking=False):
        for piece in parser.push(chunk):
            text[piece.field].append(piece.text)
            yield piece
    for piece in parser.finish():
        text[piece.field].append(piece.text)
        yield piece
    total = time.perf_counter() - started
    stats = engine.last_stats
    audio_s = len(waveform) / rate
    timings = {
        "audio_encode_s": round(stats.audio_encode_s, 4),
        "prefill_s": round(stats.prefill_s, 4),
        "decode_s": round(stats.decode_s, 4),
        "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
        "total_s": round(total, 4),
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "prefill_tok_s": round(stats.prefill_tok_s, 2),
        "decode_tok_s": round(stats.decode_tok_s, 2),
        "real_time_factor": round(total / audio_s, 4) if audio_s else 0.0,
    }
    yield Utterance(index=index, start_s=start_s, audio_s=audio_s, source_language=source.name if source else None,
                    target_language=target.name, source_text="".join(text["source"]).strip(),
                    translation="".join(text["translation"]).strip(), timings=timings)


__all__ = ["LANGUAGES", "Language", "Piece", "TranslationParser", "Utterance", "check_audio_bundle", "find_language",
           "translate_utterance", "translation_messages", "translation_prompt"]
