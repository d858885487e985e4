"""Conventions every `edgekit` command keeps: a closed pipe is not an error, help texts
speak the user's words (no Python types)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

_EDGEKIT = [sys.executable, "-m", "edgekit"]


@pytest.mark.parametrize("args", [["translate", "--list-languages"], ["devices"], ["--help"]])
def test_a_reader_that_closed_the_pipe_is_not_an_error(args):
    """`edgekit devices | head -0`: the reader is gone before the first line is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*_EDGEKIT, *args], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


def _commands() -> list[str]:
    import typer.main

    from edgekit.cli import app

    return sorted(typer.main.get_command(app).commands)


def test_every_command_is_checked_below():
    assert {"export", "plan", "run", "chat", "make-checkpoint", "translate", "bench"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_help_shows_no_python_types(command):
    """No `<int>`, `<str>`, `<path>`, `<bool>` or `list[...]`: values are named N, TEXT, FILE..."""
    import re

    result = subprocess.run([*_EDGEKIT, command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"<[a-z][\w\[\], |]*>|list\[", result.stdout), result.stdout


def test_export_help_lists_the_formats_recipes_and_default_output():
    from edgekit.formats import FORMATS

    import re

    result = subprocess.run([*_EDGEKIT, "export", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = re.sub(r"-\s+", "-", " ".join(result.stdout.split()))  # help wraps lines, at hyphens too
    for fmt in FORMATS:
        assert f"{fmt.name}: {', '.join(fmt.recipes)}" in text, text
    assert "CHECKPOINT-DEVICE.edgekit" in text
