"""`edgekit devices` and `edgekit plan`: device profiles, and what a bundle for one would hold."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgekit.cli import DEVICES_OPTION, app
from edgekit.formats import FORMATS
from edgekit.models.family import MODALITIES
from edgekit.recipes import RECIPES


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


@app.command("devices")
def devices(json_output: bool = typer.Option(False, "--json", help="Print the profiles as a JSON list."),
            devices_files: list[Path] = DEVICES_OPTION) -> None:
    """List the device profiles: devices.yaml's and your own."""
    from edgekit.profiles import load_profiles

    profiles = list(load_profiles(devices=devices_files))
    if json_output:
        typer.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    # CPU, bandwidth, backend and accelerators are in --json; the table keeps what picks a
    # bundle, narrow enough for an 80-column terminal.
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for col in ("device", "budget / RAM", "format", "recipe", "model", "ctx", "audio", "vision"):
        table.add_column(col, no_wrap=True)
    for p in profiles:
        table.add_row(p.name, f"{p.memory_budget_bytes / 1e9:.1f} / {p.ram_gb:g} GB", p.format, p.recipe, p.model,
                      str(p.max_context), *("yes" if m in p.modalities else "-" for m in ("audio", "vision")))
    Console(highlight=False, markup=False).print(table)


@app.command("plan")
def plan(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (only config.json is read)."),
    device: str = typer.Option(..., "--device", "-d", help="Device profile name (see `edgekit devices`)."),
    format: str = typer.Option(None, "--format", "-f", help=f"Override the profile's format: {', '.join(FORMATS.names())}."),
    quant: str = typer.Option(None, "--quant", "-q", help=f"Override the recipe: {', '.join(RECIPES.names())}."),
    modalities: str = typer.Option(None, "--modalities", help=f"Comma list of {','.join(MODALITIES)}."),
    context: int = typer.Option(None, "--context", help="Context length in tokens (default: the profile's)."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    devices_files: list[Path] = DEVICES_OPTION,
) -> None:
    """Show what a bundle of CHECKPOINT for DEVICE would hold, and whether it fits."""
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    profile = load_profiles(devices=devices_files).get(device)
    result = make_plan(checkpoint, profile=profile, format_name=format, recipe_name=quant, modalities=modalities,
                       context=context)
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _print_plan(result)


def _print_plan(p) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, markup=False)
    providers = f" ({', '.join(p.execution_providers)})" if p.execution_providers else ""
    console.print(f"{p.checkpoint} -> {p.device}", style="bold")
    console.print(f"  model      {p.model}, {_params(p.checkpoint_parameters)} parameters "
                  f"({p.profile.name} recommends {p.profile.model})")
    console.print(f"  format     {p.format.name} / {p.backend}{providers}")
    console.print(f"  recipe     {p.recipe.name}: {p.recipe.description}")
    console.print(f"  context    {p.context_length} tokens; modalities {','.join(p.modalities)}; "
                  f"vision budget {p.vision_token_budget} tokens")

    table = Table(title="components", title_justify="left", show_edge=False)
    for col, justify in (("component", "left"), ("parameters", "right"), ("bits/weight", "right"),
                         ("size", "right"), ("memory", "left")):
        table.add_column(col, justify=justify)
    for c in p.components:
        table.add_row(c.name, _params(c.parameters), f"{c.bits_per_weight:.2f}", _gb(c.size_bytes),
                      "mapped" if c.memory_mapped else "resident")
    table.add_row("total", _params(sum(c.parameters for c in p.components)), "", _gb(p.bundle_size_bytes), "")
    console.print(table)

    m, kv = p.memory, p.kv_cache
    mem = Table(title="runtime memory", title_justify="left", show_edge=False)
    mem.add_column("item")
    mem.add_column("bytes", justify="right")
    mem.add_column("note")
    mem.add_row("resident weights", _gb(m.resident_weights_bytes), "all but the per-layer table")
    mem.add_row("KV cache", _gb(m.kv_cache_bytes),
                f"{kv.sliding_layers} sliding (<= {kv.sliding_window} tok) + {kv.global_layers} global layers, "
                f"{kv.shared_layers} shared; fp{kv.dtype_bits}")
    mem.add_row("activations", _gb(m.activations_bytes), "peak of prefill / vision / audio (estimate)")
    mem.add_row("total", _gb(m.total_bytes), "")
    mem.add_row("budget", _gb(m.budget_bytes), f"{p.profile.ram_gb:g} GB x {p.profile.bundle_memory_share:g}")
    mem.add_row("mapped (not counted)", _gb(m.mapped_weights_bytes), "per-layer table, memory-mapped")
    console.print(mem)
    for note in p.notes:
        console.print(f"note: {note}")
    if p.export_memory_bytes:
        from edgekit.machine import memory_bytes

        here = memory_bytes()
        enough = "" if here is None else (" (this machine has enough)" if p.export_memory_bytes <= here else
                                          f" (this machine has {_gb(here)}: the export will be refused here)")
        console.print(f"export: converting needs about {_gb(p.export_memory_bytes)} of memory{enough}")
    verdict = "fits" if p.fits else "does NOT fit"
    console.print(f"verdict: {verdict} on {p.device} ({_gb(m.total_bytes)} of {_gb(m.budget_bytes)})",
                  style="bold green" if p.fits else "bold red")
