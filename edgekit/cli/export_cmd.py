"""`edgekit export` and `edgekit verify`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekit.cli import DEVICES_OPTION, app
from edgekit.formats import FORMATS


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT",
                                      help="Checkpoint directory (config.json, *.safetensors, tokenizer)."),
    device: str = typer.Option(..., "--device", "-d", metavar="DEVICE",
                               help="Device profile name (see `edgekit devices`)."),
    format: str = typer.Option(None, "--format", "-f", metavar="FORMAT",
                               help=f"{' | '.join(FORMATS.names())} (default: the profile's)."),
    quant: str = typer.Option(None, "--quant", "-q", metavar="RECIPE", help="Quantization recipe (default: the "
                              "profile's): " + "; ".join(f"{f.name}: {', '.join(f.recipes)}" for f in FORMATS) + "."),
    modalities: str = typer.Option(None, "--modalities", metavar="LIST", help="Comma list of text,audio,vision."),
    context: int = typer.Option(None, "--context", metavar="TOKENS",
                                help="Context length (default: the profile's, or the model's if smaller)."),
    output: Path = typer.Option(None, "--output", "-o", metavar="DIR",
                                help="Bundle directory to write (default: CHECKPOINT-DEVICE.edgekit here)."),
    external_weights: bool = typer.Option(
        False, "--external-weights", help="ExecuTorch: put the embedding tables (the weights outside delegates) in model.ptd beside model.pte."),
    force: bool = typer.Option(False, "--force", help="Export even if the plan says it does not fit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    devices_files: list[Path] = DEVICES_OPTION,
) -> None:
    """Trace, quantize and write a bundle for DEVICE (checks the plan fits first)."""
    import time

    from edgekit.bundle import check_target
    from edgekit.errors import require
    from edgekit.checkpoint import load
    from edgekit.machine import check_memory
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    profile = load_profiles(devices=devices_files).get(device)
    plan = make_plan(checkpoint, profile=profile, format_name=format, recipe_name=quant, modalities=modalities,
                     context=context, external_weights=external_weights)
    plan.check_fits(force=force)
    if plan.format.kv_cache_built_at_export:
        check_memory(f"the {plan.context_length}-token KV cache this export builds", plan.kv_cache.total_bytes)
    if plan.export_memory_bytes:
        check_memory(f"this {plan.format.name} export (the plan's estimate of its peak)", plan.export_memory_bytes)
    target = output or Path(f"{checkpoint.resolve().name}-{device}.edgekit")
    check_target(target, overwrite=overwrite)  # before seconds of imports and minutes of loading, not after
    require("torch", extra="export")
    from edgekit.export import exporter_for

    exporter = exporter_for(plan.format.name)
    started = time.perf_counter()
    bundle = exporter(load(checkpoint), plan=plan, output=target, overwrite=overwrite)
    seconds = time.perf_counter() - started
    size = bundle.manifest.total_size
    summary = {"bundle": str(bundle.path), "format": plan.format.name, "recipe": plan.recipe.name,
               "modalities": list(plan.modalities), "bytes": size, "seconds": round(seconds, 1)}
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"wrote {bundle.path} ({plan.format.name}, {plan.recipe.name}, "
                   f"{'+'.join(plan.modalities)}, {size / 1e6:.1f} MB) in {seconds:.0f} s")


@app.command("verify")
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit)."),
    reference: Path = typer.Option(..., "--reference", help="The checkpoint the bundle was exported from."),
    steps: int = typer.Option(64, "--steps", help="Greedy decode steps to compare."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    save: bool = typer.Option(True, "--save/--no-save", help="Save the report in the bundle's manifest."),
) -> None:
    """Check a bundle's outputs against the transformers reference model (exit 8 if a bound is missed)."""
    from edgekit.errors import InputError, require
    from edgekit.checkpoint import load

    if steps < 1:
        raise InputError(f"--steps must be at least 1; got {steps}")
    require("torch", extra="export")
    from edgekit.export.verify import check, verify_bundle

    report = verify_bundle(bundle, load(reference), steps=steps, save=save)
    if json_output:
        typer.echo(json.dumps(report))
    else:
        _print_report(report)
    check(report)


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"verify ({report['recipe']}, {report['steps']} greedy steps)")
    for column in ("method", "max abs diff", "max rel diff", "cosine", "greedy agreement"):
        table.add_column(column)
    for name, m in report["methods"].items():
        table.add_row(name, f"{m['max_abs_diff']:.2e}", f"{m['max_rel_diff']:.2e}" if "max_rel_diff" in m else "",
                      f"{m.get('min_cosine', m.get('cosine')):.6f}",
                      f"{m['token_agreement']:.0%}" if "token_agreement" in m else "")
    Console().print(table)
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    typer.echo(f"verification {verdict}")
