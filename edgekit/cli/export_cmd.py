"""`edgekit export` and `edgekit verify`."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli import app
from edgekit.errors import NotAvailableError


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (config.json, *.safetensors, tokenizer)."),
    device: str = typer.Option(..., "--device", "-d", help="Device profile name (see `edgekit devices`)."),
    format: str = typer.Option(None, "--format", "-f", help="Override the profile's preferred format."),
    quant: str = typer.Option(None, "--quant", "-q", help="Override the profile's quantization recipe."),
    modalities: str = typer.Option(None, "--modalities", help="Comma list of text,audio,vision."),
    output: Path = typer.Option(None, "--output", "-o", help="Bundle directory to write (NAME.edgekit)."),
    force: bool = typer.Option(False, "--force", help="Export even if the plan says it does not fit."),
) -> None:
    """Trace, quantize and write a bundle for DEVICE."""
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    profile = load_profiles().get(device)
    plan = make_plan(checkpoint, profile=profile, format_name=format, recipe_name=quant, modalities=modalities)
    plan.check_fits(force=force)
    raise NotAvailableError(
        f"the {plan.format.name} exporter has not landed yet; `edgekit plan {checkpoint} --device {device}` "
        "shows what it would write"
    )


@app.command("verify")
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit)."),
    reference: Path = typer.Option(..., "--reference", help="The checkpoint the bundle was exported from."),
    steps: int = typer.Option(64, "--steps", help="Greedy decode steps to compare."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a bundle's outputs against the transformers reference model."""
    raise NotAvailableError("verify needs the exporters, which have not landed yet")
