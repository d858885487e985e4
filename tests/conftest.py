"""Shared fixtures: random-weight checkpoints written once per test session.

They go through `make_checkpoint`, the same code `edgekit make-checkpoint` runs, and
are loaded through the same path as a downloaded checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_e2b(tmp_path_factory) -> Path:
    from edgekit.checkpoint_writer import make_checkpoint
    from edgekit.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ckpt") / "tiny-e2b", seed=0)


@pytest.fixture(scope="session")
def tiny_e4b(tmp_path_factory) -> Path:
    from edgekit.checkpoint_writer import make_checkpoint
    from edgekit.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e4b"], tmp_path_factory.mktemp("ckpt") / "tiny-e4b", seed=0)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m edgekit ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout, input=input)


def assert_clean_failure(result: subprocess.CompletedProcess, *, code: int | None = None,
                         contains: str | None = None) -> None:
    """A bad input gives a non-zero exit and one line on stderr, without a traceback."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    if contains is not None:
        assert contains in lines[0], lines[0]
