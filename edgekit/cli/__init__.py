"""The `edgekit` command: a thin layer that parses, resolves names and calls the library.

Every EdgekitError becomes one line on stderr and its exit code; a traceback is shown
only with --debug.
"""

from __future__ import annotations

import sys

import click
import typer

from edgekit.errors import EdgekitError

app = typer.Typer(
    name="edgekit",
    help="Put Gemma 4 edge models (E2B / E4B) on real devices: plan, export, verify, run offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", help="Print the edgekit version and exit.", is_eager=True),
) -> None:
    if version:
        from edgekit import __version__

        typer.echo(f"edgekit {__version__}")
        raise typer.Exit(0)


# Command modules register themselves on `app`; imported here so `edgekit --help` lists them.
from edgekit.cli import checkpoint_cmd, devices_cmd, bundle_cmd, export_cmd, runtime_cmd  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, prog_name="edgekit", standalone_mode=False)
    except EdgekitError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # a bug, not a user mistake: still one line without --debug
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)


def _fail(message: str, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"edgekit: error: {first_line}", file=sys.stderr)
    sys.exit(code)
