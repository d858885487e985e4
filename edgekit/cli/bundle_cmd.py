"""`edgekit inspect BUNDLE`: what a bundle holds, checked against its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from edgekit.bundle import VerifyLevel
from edgekit.cli import app


@app.command("inspect")
def inspect(
    bundle: Path = typer.Argument(..., help="A NAME.edgekit directory."),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a summary."),
    verify: VerifyLevel = typer.Option("cached", "--verify",
                                       help="Check files first: cached (sha256, each file hashed once and "
                                            "remembered), full (sha256 of every file now), sizes, none."),
) -> None:
    """Show a bundle's model, device, format, methods and files."""
    from edgekit.bundle import inspect_bundle, load_bundle

    if json_output:
        typer.echo(json.dumps(load_bundle(bundle, verify=verify).manifest.to_dict(), indent=2))
        return
    _print_summary(inspect_bundle(bundle, verify=verify))


def _shape(tensor: dict[str, Any]) -> str:
    return f"{tensor['name']}: {tensor['dtype']}[{','.join(str(d) for d in tensor['shape'])}]"


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgekit.bundle import format_bytes

    # markup off: "int64[seq_len]" and names from the manifest are data, not rich tags.
    console = Console(highlight=False, markup=False)
    model = s["model"]
    providers = f" ({', '.join(s['execution_providers'])})" if s["execution_providers"] else ""
    schemes = ", ".join(f"{k}={v}" for k, v in s["quant_schemes"].items()) or "none"
    console.print(s["path"], style="bold")
    console.print(f"  model    {model['name']} ({model['architecture']} {model['size']}, {model['num_layers']} layers, "
                  f"hidden {model['hidden_size']}, vocab {model['vocab_size']})")
    console.print(f"  device   {s['device']}")
    console.print(f"  format   {s['format']} / {s['backend']}{providers}")
    console.print(f"  quant    {s['recipe']}: {schemes}")
    console.print(f"  context  {s['max_context']} tokens")
    console.print(f"  created  {s['created_at']} by edgekit {s['edgekit_version']} (schema {s['schema_version']})")

    methods = Table(title="methods", title_justify="left", show_edge=False)
    for col in ("method", "file", "inputs", "outputs"):
        methods.add_column(col)
    for m in s["methods"]:
        methods.add_row(m["name"], m["file"], "\n".join(_shape(t) for t in m["inputs"]),
                        "\n".join(_shape(t) for t in m["outputs"]))
    console.print(methods)

    files = Table(title="files", title_justify="left", show_edge=False)
    files.add_column("file")
    files.add_column("size", justify="right")
    for f in s["files"]:
        files.add_row(f["path"], format_bytes(f["size"]))
    console.print(files)
    checked = {"cached": "sha256 verified", "full": "sha256 verified", "sizes": "sizes checked",
               "none": "not checked"}[s["files_checked"]]
    console.print(f"  total    {format_bytes(s['total_size'])} in {len(s['files'])} files ({checked})")
    console.print(f"  parity   {s['verification']}")
