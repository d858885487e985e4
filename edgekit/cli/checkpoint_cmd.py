"""`edgekit make-checkpoint`: write a random-weight Gemma 4 checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekit.cli import app
from edgekit.models import get_preset, preset_names


@app.command("make-checkpoint")
def make_checkpoint(
    preset: str = typer.Argument(..., help=f"One of: {', '.join(preset_names())}."),
    out_dir: Path = typer.Argument(..., help="Directory to write (must not exist or be empty)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the weights."),
    layers: int = typer.Option(None, "--layers", help="Cut the decoder to N layers (keeps the layer pattern)."),
    no_audio: bool = typer.Option(False, "--no-audio", help="Leave the audio tower out (audio_config null)."),
    no_vision: bool = typer.Option(False, "--no-vision", help="Leave the vision tower out (vision_config null)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a random-weight checkpoint with the files of a downloaded google/gemma-4 model."""
    from edgekit.testing.checkpoint_writer import make_checkpoint as write
    from edgekit.checkpoint import load

    path = write(get_preset(preset), out_dir, seed=seed, layers=layers, audio=not no_audio, vision=not no_vision,
                 overwrite=overwrite)
    checkpoint = load(path, check_shapes=False)
    files = sorted(p.name for p in path.iterdir())
    size = sum(p.stat().st_size for p in path.iterdir())
    summary = {"path": str(path), "preset": preset, "layers": checkpoint.text_config["num_hidden_layers"],
               "files": files, "bytes": size}
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"wrote {preset} ({summary['layers']} layers, {size / 1e6:.1f} MB) to {path}")
