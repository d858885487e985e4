"""Device-side commands: run, chat, translate, bench (the runner lands with the exporters)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli import app
from edgekit.errors import NotAvailableError


def _not_yet(what: str) -> NotAvailableError:
    return NotAvailableError(f"`edgekit {what}` needs the runner, which has not landed yet")


@app.command("run")
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="User message."),
    image: Path = typer.Option(None, "--image", help="Image file to show the model."),
    audio: Path = typer.Option(None, "--audio", help="WAV file to play to the model."),
) -> None:
    """Generate an answer to one prompt, streaming tokens as they come."""
    raise _not_yet("run")


@app.command("chat")
def chat(bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit).")) -> None:
    """Interactive multi-turn chat that keeps the KV cache across turns."""
    raise _not_yet("chat")


@app.command("translate")
def translate(
    bundle: Path = typer.Argument(..., help="Bundle directory with the audio encoder."),
    to: str = typer.Option(..., "--to", help="Target language, e.g. Japanese."),
    wav: Path = typer.Option(None, "--wav", help="WAV file to translate."),
    mic: bool = typer.Option(False, "--mic", help="Listen to the microphone."),
) -> None:
    """Offline speech-to-translation from a WAV file or the microphone."""
    raise _not_yet("translate")


@app.command("bench")
def bench(bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit).")) -> None:
    """Measure load time, prefill and decode speed and peak memory of a bundle."""
    raise _not_yet("bench")
