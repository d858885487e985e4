"""Writing outputs: Ctrl-C says so in one line.

Checkpoints through `edgekit make-checkpoint` and bundles through `edgekit export`: the
code users run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT


# --- Ctrl-C ------------------------------------------------------------------------------


def _interrupt_when(argv: list[str], folder: Path, prefix: str, sig: int) -> subprocess.CompletedProcess:
    """Run the CLI, send `sig` once a `prefix`* folder appears in `folder`, wait for it."""
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(prefix) for p in folder.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("command", ["make-checkpoint", "export"])
def test_ctrl_c_says_interrupted_and_leaves_nothing(tmp_path, tiny_e2b, command):
    out = tmp_path / "out"
    out.mkdir()
    if command == "make-checkpoint":
        argv, prefix = ["make-checkpoint", "e2b-shape", str(out / "ck"), "--layers", "2"], ".ck.tmp-"
    else:
        argv, prefix = ["export", str(tiny_e2b), "--device", "pi5-8gb", "-o", str(out / "b.edgekit")], ".b.edgekit.raw-"
    result = _interrupt_when(argv, out, prefix, signal.SIGINT)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["edgekit: error: interrupted"]
    assert list(out.iterdir()) == []
