"""Writing outputs: Ctrl-C says so in one line, and a killed run's leftovers are swept by
the next run.

Checkpoints through `edgekit make-checkpoint` and bundles through `edgekit export`: the
code users run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit import scratch_dirs
from edgekit.bundle import load_bundle
from edgekit.errors import BundleError
from edgekit.scratch_dirs import OLD_MARK, RAW_MARK, TEMP_MARK, sweep_stale
from tests.conftest import ROOT, run_cli
from tests.test_bundle import write_bundle


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


# --- a killed run's leftovers --------------------------------------------------------------


def test_a_killed_export_is_swept_by_the_next(tmp_path, tiny_e2b_4layers):
    """kill -9 leaves the temporary bundle and the raw graphs; the next export to the same
    path removes them (their process is gone) and writes the bundle."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "b.edgekit"
    argv = ["export", str(tiny_e2b_4layers), "--device", "pi5-8gb", "--modalities", "text", "-o", str(target)]
    _interrupt_when(argv, out, ".b.edgekit.raw-", signal.SIGKILL)
    left = sorted(p.name for p in out.iterdir())
    assert any(TEMP_MARK in n for n in left) and any(RAW_MARK in n for n in left), left
    assert run_cli(*argv).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["b.edgekit"]


def test_a_killed_make_checkpoint_is_swept_by_the_next(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["make-checkpoint", "tiny-e2b", str(out / "ck"), "--layers", "2"]
    _interrupt_when(argv, out, ".ck.tmp-", signal.SIGKILL)
    assert run_cli(*argv).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["ck"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _owned_name(target: Path, mark: str, pid: int, host: str | None = None, suffix: str = "0123abcd") -> Path:
    return target.parent / f".{target.name}{mark}{host or scratch_dirs._host_tag()}-{pid}-{suffix}"


def test_sweep_removes_only_edgekit_folders_whose_process_is_gone(tmp_path):
    target = tmp_path / "b.edgekit"
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = _dead_pid()
        swept = [_owned_name(target, TEMP_MARK, dead), _owned_name(target, RAW_MARK, dead)]
        kept = [
            _owned_name(target, TEMP_MARK, live.pid),  # a run still writing
            _owned_name(target, TEMP_MARK, os.getpid()),
            _owned_name(target, TEMP_MARK, dead, host="ffffffff"),  # another machine's, on a shared disk
            tmp_path / f".b.edgekit{TEMP_MARK}0123abcd",  # an older edgekit's: no owner to ask
            _owned_name(tmp_path / "other.edgekit", TEMP_MARK, dead),  # another output's
            tmp_path / f".b.edgekit{TEMP_MARK}user-folder",
        ]
        for folder in swept + kept:
            folder.mkdir()
            (folder / "weights.bin").write_bytes(b"w")
        link = _owned_name(target, RAW_MARK, dead, suffix="11111111")  # removing it could follow it
        link.symlink_to(kept[-1])
        a_file = _owned_name(target, RAW_MARK, dead, suffix="22222222")
        a_file.write_text("not a folder edgekit made")
        sweep_stale(target)
        assert [f.exists() for f in swept] == [False, False]
        assert all((f / "weights.bin").exists() for f in kept)
        assert link.is_symlink() and a_file.read_text() == "not a folder edgekit made"
    finally:
        live.kill()
        live.wait()


def test_sweep_puts_back_a_bundle_set_aside_by_a_killed_overwrite(tmp_path):
    """Killed between setting the old bundle aside and renaming the new one in: the old
    one is the user's bundle, put back, not deleted; with a new one in place, it goes."""
    target = write_bundle(tmp_path / "b.edgekit")
    aside = _owned_name(target, OLD_MARK, _dead_pid())
    target.rename(aside)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(target)  # the sweep put it back, and it is not overwritten unasked
    assert load_bundle(target).manifest.device == "pi5"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    sweep_stale(target)
    assert not aside.exists() and target.is_dir()
