"""`edgekit translate`: offline speech -> transcription + translation, from a WAV file or the microphone.

Thin: it resolves names (languages, the input device), picks the segmenter and prints;
edgekit.apps.translate.loop, .vad and .microphone do the work.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from edgekit.cli import app
from edgekit.cli.runtime_cmd import _SEED, _TEMP, _THREADS, _TOP_K, _TOP_P, _sampling
from edgekit.errors import InputError

MAX_FILE_SECONDS = 3600.0  # a WAV is decoded whole: an hour at 16 kHz is 230 MB of float32


def _list_languages(value: bool) -> None:
    if value:
        from edgekit.apps.translate.loop import LANGUAGES

        for lang in LANGUAGES:
            typer.echo(f"{lang.code:4} {lang.name:12} {', '.join(lang.aliases)}".rstrip())
        raise typer.Exit(0)


@app.command("translate")
def translate(
    bundle: Path = typer.Argument(..., help="Bundle directory with the audio encoder (NAME.edgekit)."),
    to: str = typer.Option(..., "--to", help="Target language: English name or ISO code (Japanese, ja)."),
    from_: str = typer.Option(None, "--from", help="Spoken language (default: let the model tell)."),
    wav: Path = typer.Option(None, "--wav", help="WAV file to translate (any rate, mono or stereo). It is cut into "
                                                 "utterances at pauses like the microphone; speech longer than 30 s "
                                                 "is split at its quietest moment."),
    no_vad: bool = typer.Option(False, "--no-vad", help="With --wav: translate the file as one utterance "
                                                        "(still split at pauses past 30 s)."),
    mic: bool = typer.Option(False, "--mic", help="Listen to the microphone (needs the audio extra and PortAudio); "
                                                  "an energy voice-activity detector cuts utterances at pauses."),
    push_to_talk: bool = typer.Option(False, "--push-to-talk", help="With --mic: Enter starts and stops each "
                                                                    "utterance instead of the detector."),
    input_device: str = typer.Option(None, "--input-device", help="Microphone number or name part, from "
                                                                  "`python -m sounddevice` (default: the system's)."),
    duration: float = typer.Option(None, "--duration", help="With --mic: stop after this many seconds of audio."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Stop each answer after this many tokens."),
    temperature: float = _TEMP, top_k: int = _TOP_K, top_p: float = _TOP_P, seed: int = _SEED,
    threads: int = _THREADS,
    stats: bool = typer.Option(False, "--stats", help="Per utterance on stderr: audio length, encode time, "
                                                      "prefill and decode tok/s, real-time factor."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per utterance (text and timings)."),
    list_languages: bool = typer.Option(False, "--list-languages", help="List the language names and codes.",
                                        is_eager=True, callback=_list_languages),
) -> None:
    """Offline speech translation: transcribe and translate each utterance in one pass, printed as it streams."""
    from edgekit.bundle import load_bundle
    from edgekit.apps.translate.loop import check_audio_bundle, find_language
    from edgekit.apps.translate.vad import VadParams

    target = find_language(to)
    source = find_language(from_) if from_ else None
    if source == target:
        raise InputError(f"--from and --to are both {target.name}; pick another target language")
    if (wav is None) == (not mic):
        raise InputError("give one input: --wav FILE or --mic")
    if wav is not None and (push_to_talk or input_device is not None or duration is not None):
        raise InputError("--push-to-talk, --input-device and --duration apply to --mic only")
    if mic and no_vad:
        raise InputError("--no-vad applies to --wav only; with --mic, --push-to-talk cuts utterances by hand")
    if duration is not None and duration <= 0:
        raise InputError(f"--duration must be positive; got {duration}")

    manifest = load_bundle(bundle).manifest
    check_audio_bundle(manifest, where=str(bundle))
    audio = manifest.audio_preprocessing
    vad_params = VadParams(sample_rate=audio.sampling_rate, max_seconds=audio.max_tokens * audio.ms_per_token / 1000)
    sampling = _sampling(max_new_tokens, temperature, top_k, top_p, seed)
    printer = _Printer(source=source, target=target, json_output=json_output, stats=stats)

    if wav is not None:  # read and cut the file before loading the model: bad input fails fast
        segments = _file_segments(wav, vad_params, whole=no_vad)
        engine = _open_engine(bundle, threads)
        for index, segment in enumerate(segments, 1):
            printer.utterance(engine, segment, index, sampling)
        return
    _listen(bundle, threads, printer, sampling, vad_params, push_to_talk=push_to_talk,
            device=_device(input_device), duration=duration)


def _open_engine(bundle: Path, threads: int | None):
    from edgekit.runtimes.engine import Engine

    return Engine.open(bundle, threads=threads)


def _device(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.strip().isdigit() else value


def _file_segments(path: Path, params: Any, *, whole: bool) -> list:
    from edgekit.apps.translate.vad import segment_waveform, split_long
    from edgekit.runtimes.wav_io import load_audio, wav_info

    length = wav_info(path).duration
    if length > MAX_FILE_SECONDS:
        raise InputError(f"{path} is {length / 60:.0f} min long; edgekit translate reads files up to "
                         f"{MAX_FILE_SECONDS / 60:.0f} min: cut it first (sox {path} part.wav trim 0 3600)")
    waveform = load_audio(path, target_rate=params.sample_rate, max_seconds=MAX_FILE_SECONDS)
    if whole:
        return split_long(waveform, params.sample_rate, max_seconds=params.max_seconds,
                          search_seconds=params.split_search_s, frame_ms=params.frame_ms)
    segments = segment_waveform(waveform, params=params)
    if not segments:
        raise InputError(f"no speech found in {path}: nothing stands {params.start_db:g} dB above its noise floor "
                         "for long enough; if it is speech, translate it whole with --no-vad")
    return segments


def _listen(bundle: Path, threads: int | None, printer: _Printer, sampling: Any, params: Any, *,
            push_to_talk: bool, device: int | str | None, duration: float | None) -> None:
    from edgekit.apps.translate.microphone import Microphone
    from edgekit.apps.translate.vad import EnergyVad, PushToTalk

    segmenter = PushToTalk(params) if push_to_talk else EnergyVad(params)
    # Opening the device first: a missing microphone fails before the model loads.
    microphone = Microphone(segmenter=segmenter, rate=params.sample_rate, device=device, duration_s=duration,
                            on_notice=lambda message: typer.echo(f"edgekit: warning: {message}", err=True))
    engine = _open_engine(bundle, threads)
    how = "press Enter to start and stop talking" if push_to_talk else "energy VAD cuts at pauses"
    typer.echo(f"listening on {microphone.device.name} at {microphone.device.sample_rate} Hz ({how}); "
               "Ctrl-C stops", err=True)
    try:
        with microphone:
            if push_to_talk:
                _start_enter_toggle(segmenter, microphone)
            for index, segment in enumerate(microphone.utterances(), 1):
                printer.utterance(engine, segment, index, sampling)
    except KeyboardInterrupt:
        return
    if microphone.stopped_by_device:
        raise InputError("the microphone stopped sending audio (unplugged?); check it with `python -m sounddevice`")


def _start_enter_toggle(segmenter: Any, microphone: Any) -> None:
    """Each Enter on stdin toggles talking; end of input stops listening."""
    def loop() -> None:
        for _ in sys.stdin:
            segmenter.set_talking(not segmenter.talking)
            typer.echo("recording... (Enter stops)" if segmenter.talking else "stopped", err=True)
        segmenter.set_talking(False)
        microphone.close()

    threading.Thread(target=loop, name="edgekit-push-to-talk", daemon=True).start()


class _Printer:
    """Streams each utterance to stdout: `English: ...` then `Japanese: ...`, or one JSON line."""

    def __init__(self, *, source: Any, target: Any, json_output: bool, stats: bool) -> None:
        self.source_label = source.name if source else "Heard"
        self.target, self.source, self.json_output, self.stats = target, source, json_output, stats

    def utterance(self, engine: Any, segment: Any, index: int, sampling: Any) -> None:
        from edgekit.apps.translate.loop import Piece, translate_utterance

        out = sys.stdout
        opened: set[str] = set()
        result = None
        for event in translate_utterance(engine, segment.audio, source=self.source, target=self.target,
                                         sampling=sampling, index=index, start_s=segment.start_s):
            if not isinstance(event, Piece):
                result = event
            elif not self.json_output:
                if event.field not in opened:
                    label = self.source_label if event.field == "source" else self.target.name
                    out.write(("\n" if opened else "") + f"{label}: ")
                    opened.add(event.field)
                out.write(event.text)
                out.flush()
        if self.json_output:
            out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        else:
            out.write(f"{self.source_label}: \n" if not opened else "\n")
        out.flush()
        if self.stats:
            t = result.timings
            typer.echo(f"[{index}] audio {result.audio_s:.2f} s | encode {t['audio_encode_s']:.2f} s | "
                       f"prefill {t['prefill_tok_s']:.0f} tok/s | decode {t['decode_tok_s']:.1f} tok/s | "
                       f"RTF {t['real_time_factor']:.2f} ({t['total_s']:.2f} s)", err=True)
