"""One exception type per kind of user mistake.

The CLI turns each into one line on stderr and the exit code below, so scripts can
tell a bad checkpoint from a model that does not fit from a failed verification.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base class: a problem the user can act on. Never shown with a traceback."""

    exit_code = 1


class InputError(EdgekitError):
    """A bad argument, file or value given on the command line or to the API."""

    exit_code = 2


class CheckpointError(EdgekitError):
    """The checkpoint directory is missing files, corrupt, or not Gemma 4."""

    exit_code = 3


class DeviceProfileError(EdgekitError):
    """devices.yaml is malformed, or a device name is unknown."""

    exit_code = 4


class DoesNotFitError(EdgekitError):
    """The planned bundle exceeds the device's memory budget (use --force to override)."""

    exit_code = 5


class BundleError(EdgekitError):
    """A bundle is incomplete, tampered with, or of an unknown schema."""

    exit_code = 6


class ExportError(EdgekitError):
    """An exporter failed (unsupported recipe, missing tower, disk full, ...)."""

    exit_code = 7


class VerificationError(EdgekitError):
    """An exported artifact missed a parity bound against the reference."""

    exit_code = 8


class NotAvailableError(EdgekitError):
    """What was asked exists as a name but cannot run here (a format with no exporter yet, a
    bundle that runs only on Apple hardware)."""

    exit_code = 69  # EX_UNAVAILABLE from sysexits.h


class MissingDependencyError(EdgekitError):
    """An optional package is needed; the message names the extra that installs it."""

    exit_code = 10


def install_line(extra: str = "") -> str:
    """The pip command that brings an extra ("" for the base package)."""
    from edgekit import DISTRIBUTION

    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install '{DISTRIBUTION}'"


def require(module: str, *, extra: str):
    """Import an optional dependency or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{module} is not installed ({exc}); install it with: {install_line(extra)}") from exc
