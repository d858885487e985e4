"""The `edgekit` command: a thin layer that parses, resolves names and calls the library.

Every EdgekitError becomes one line on stderr and its exit code; a traceback is shown
only with --debug.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import typer
from typer.exceptions import Abort, Exit, TyperException

from edgekit.errors import EdgekitError

app = typer.Typer(
    name="edgekit",
    help="Put Gemma 4 edge models (E2B / E4B) on real devices: plan, export, verify, run offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels label every option with its Python type ("<bool>").
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from edgekit import __version__

        typer.echo(f"edgekit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", help="Print the edgekit version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Options that apply to every command."""


def error_line(message: str) -> str:
    """How every error reads on stderr: one line."""
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    return f"edgekit: error: {first_line}"


# Every command that takes --device takes this too, so a user's own profiles work everywhere.
DEVICES_OPTION: Any = typer.Option(
    [], "--devices", metavar="FILE",
    help="Your own devices.yaml: adds profiles or replaces packaged ones by name (repeatable; "
         "EDGEKIT_DEVICES=FILE[:FILE] does the same).")

# Command modules register themselves on `app`; imported here so `edgekit --help` lists them.
from edgekit.cli import checkpoint_cmd, devices_cmd, bundle_cmd, export_cmd, runtime_cmd  # noqa: E402,F401
from edgekit.apps import register_commands  # noqa: E402

register_commands()


# What a value is called in help, in the user's words; typer >= 0.28 would print the
# Python type ("<int>", "<str>") for any option that names none.
_METAVARS: dict[str, str] = {"int": "N", "float": "X", "str": "TEXT", "Path": "PATH"}


def _name_metavars() -> None:
    import inspect

    from typer.models import ArgumentInfo, OptionInfo

    for command in app.registered_commands:
        for param in inspect.signature(command.callback, eval_str=True).parameters.values():
            info = param.default
            if not isinstance(info, (OptionInfo, ArgumentInfo)) or info.metavar is not None:
                continue
            if isinstance(info, ArgumentInfo):
                info.metavar = param.name.upper()
            elif param.annotation is not bool:
                kind = getattr(param.annotation, "__args__", (param.annotation,))[0]  # list[Path] -> Path
                info.metavar = _METAVARS.get(getattr(kind, "__name__", ""), "VALUE")


_name_metavars()


def _quiet_third_party() -> None:
    """Keep stderr for our own messages: libraries' import chatter hides the one error line."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")  # deprecation chatter from torch/onnx; --debug shows it
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars (ours are rich)
    os.environ.setdefault("ET_COREML_LOG_LEVEL", "ERROR")  # ExecuTorch's Core ML partitioner sets its own level
    for name in ("torchao", "torch.utils._pytree", "transformers", "onnxscript", "onnx_ir", "coremltools", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # edgekit never downloads at run time
    # ExecuTorch's C++ runtime logs its CPU probing to fd 2 when XNNPACK first loads.
    os.environ.setdefault("EDGEKIT_NATIVE_LOGS", "hide")


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised where the program is so that every `with` and `finally`
    cleans up (a bundle's or checkpoint's temporary folder) as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def _is_devnull(fd: int) -> bool:
    import os

    try:
        out, null = os.fstat(fd), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (out.st_rdev, out.st_ino) == (null.st_rdev, null.st_ino)


# typer turns a KeyboardInterrupt inside a command into a silent return of 130, which would
# look like any command's own exit status; Ctrl-C is recorded here to say so in one line.
_interrupted = threading.Event()


def _raise_interrupt(signum: int, frame: Any) -> None:
    _interrupted.set()
    signal.default_int_handler(signum, frame)


def main(argv: list[str] | None = None) -> None:
    stdout_was_null = _is_devnull(1)  # `edgekit ... > /dev/null`: an exit 1 there is a real one
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):  # systemd stops a service with SIGTERM; a closed ssh sends SIGHUP
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
            signal.signal(signal.SIGINT, _raise_interrupt)
    if not debug:
        _quiet_third_party()
    if not argv:
        argv = ["--help"]
    try:
        status = app(args=argv, prog_name="edgekit", standalone_mode=False)
        if status == 130 and _interrupted.is_set():
            _fail("interrupted", 130)
        if isinstance(status, int) and status:  # a command's typer.Exit(code), returned in this mode
            sys.exit(status)
    except EdgekitError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: bad option, missing argument, bad value
        _fail(f"{exc.format_message()} (see `edgekit --help`)", 2)
    except BrokenPipeError:  # `edgekit ... | head` closed the pipe: the reader has what it wanted
        _silence_stdout()
        sys.exit(0)
    except SystemExit as exc:
        if exc.code == 1 and _stdout_was_closed(was_null=stdout_was_null):
            sys.exit(0)
        raise
    except (Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except Terminated as exc:
        _fail(f"stopped by {exc}", 128 + exc.signum)
    except Exception as exc:  # a bug, not a user mistake: still one line without --debug
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)


def _stdout_was_closed(*, was_null: bool) -> bool:
    """Whether a library met a closed stdout pipe and exited 1 for it: click wraps stdout to
    hush the next flush; rich points stdout at /dev/null first."""
    if type(sys.stdout).__name__.lstrip("_") == "PacifyFlushWrapper":
        return True
    return not was_null and _is_devnull(1)


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; pointing it at /dev/null keeps that flush quiet.
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _fail(message: str, code: int) -> None:
    print(error_line(message), file=sys.stderr)
    sys.exit(code)
