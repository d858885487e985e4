"""Writing outputs: --overwrite deletes only what edgekit wrote, a killed run's leftovers are
swept by the next run, Ctrl-C says so, outputs get the permissions of any new file, and
--threads and sizes that would exhaust the machine are refused up front.

Checkpoints through `make_checkpoint` / `edgekit make-checkpoint` and bundles through the
exporters and `edgekit export`: the code users run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit import scratch_dirs
from edgekit.bundle import load_bundle
from edgekit.testing.checkpoint_writer import make_checkpoint
from edgekit.errors import BundleError, InputError
from edgekit.machine import usable_cpus
from edgekit.overwrite_guard import MARKER_FILE
from edgekit.models.gemma4.presets import PRESETS
from edgekit.scratch_dirs import OLD_MARK, RAW_MARK, TEMP_MARK, sweep_stale
from tests.conftest import ROOT, assert_clean_failure, run_cli
from tests.test_bundle import write_bundle

TINY = PRESETS["tiny-e2b"]


def small_checkpoint(path: Path, seed: int = 0, overwrite: bool = False) -> Path:
    return make_checkpoint(TINY, path, seed=seed, layers=2, audio=False, vision=False, overwrite=overwrite)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- --overwrite deletes only what edgekit wrote -------------------------------------------


def test_make_checkpoint_overwrite_refuses_folders_edgekit_did_not_write(tmp_path, tiny_e2b):
    """A user's notes beside a gemma4 config.json, a downloaded checkpoint (all checkpoint
    files, no marker), an edgekit checkpoint the user added a file to: each kept as it was."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": {}}))
    (notes / "todo.txt").write_text("mine")
    downloaded = tmp_path / "downloaded"
    shutil.copytree(tiny_e2b, downloaded)
    (downloaded / MARKER_FILE).unlink()
    added_to = small_checkpoint(tmp_path / "added-to")
    (added_to / "results.md").write_text("my eval numbers")
    for folder in (notes, downloaded, added_to):
        before = snapshot(folder)
        with pytest.raises(InputError, match=f"refusing to overwrite {folder}"):
            small_checkpoint(folder, overwrite=True)
        assert snapshot(folder) == before
    result = run_cli("make-checkpoint", "tiny-e2b", str(downloaded), "--overwrite", "--layers", "2")
    assert_clean_failure(result, code=2, contains="edgekit did not write it")
    assert (downloaded / "model.safetensors").is_file()
    assert_clean_failure(run_cli("make-checkpoint", "tiny-e2b", str(added_to), "--overwrite", "--layers", "2"),
                         code=2, contains="results.md is not a file edgekit wrote there")


def test_make_checkpoint_overwrites_its_own_checkpoint(tmp_path):
    first = small_checkpoint(tmp_path / "ck", seed=1)
    weights = (first / "model.safetensors").read_bytes()
    (first / ".DS_Store").write_bytes(b"finder")  # a desktop's litter is no one's data
    small_checkpoint(first, seed=2, overwrite=True)
    assert (first / "model.safetensors").read_bytes() != weights
    marker = json.loads((first / MARKER_FILE).read_text())
    assert set(marker["files"]) == {p.name for p in first.iterdir()} - {MARKER_FILE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_make_checkpoint_refuses_a_link_as_its_folder(tmp_path):
    real = small_checkpoint(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(InputError, match="it is a link"):
        make_checkpoint(TINY, tmp_path / "link", layers=2, overwrite=True)
    assert (real / "model.safetensors").is_file() and (tmp_path / "link").is_symlink()


def test_export_overwrite_refuses_a_bundle_holding_a_file_it_does_not_list(tmp_path, tiny_e2b):
    """The manifest marks a bundle as edgekit's, and lists all that edgekit wrote in it."""
    target = write_bundle(tmp_path / "tiny.edgekit")
    (target / "my-notes.txt").write_text("mine")
    before = snapshot(target)
    with pytest.raises(InputError, match="my-notes.txt is not a file edgekit wrote there"):
        write_bundle(target, overwrite=True)
    assert snapshot(target) == before
    result = run_cli("export", str(tiny_e2b), "--device", "pi5-8gb", "-o", str(target), "--overwrite")
    assert_clean_failure(result, code=2, contains="my-notes.txt is not a file edgekit wrote there")
    assert snapshot(target) == before
    (target / "my-notes.txt").unlink()
    (target / ".DS_Store").write_bytes(b"finder")
    write_bundle(target, overwrite=True, payload=b"new")
    assert load_bundle(target).file("decoder.onnx.data").read_bytes() == b"new"


def test_export_overwrite_refuses_a_link_inside_a_bundle(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    (tmp_path / "precious").mkdir()
    (target / "decoder.onnx.data").unlink()
    (target / "decoder.onnx.data").symlink_to(tmp_path / "precious")
    with pytest.raises(InputError, match="decoder.onnx.data is not a file edgekit wrote there"):
        write_bundle(target, overwrite=True)


# --- permissions -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_make_checkpoint_uses_normal_permissions(tmp_path, umask):
    """Not mkdtemp's 0700 and safetensors' 0600: what any new folder and file get."""
    code = (f"import os; os.umask({umask}); from pathlib import Path; from edgekit.testing.checkpoint_writer import "
            f"make_checkpoint; from edgekit.models.gemma4.presets import PRESETS; make_checkpoint(PRESETS['tiny-e2b'], "
            f"Path({str(tmp_path / 'ck')!r}), layers=2, audio=False, vision=False); os.mkdir({str(tmp_path / 'd')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    ck = tmp_path / "ck"
    assert ck.stat().st_mode & 0o777 == (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in ck.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --- Ctrl-C ------------------------------------------------------------------------------


def _interrupt_when(argv: list[str], folder: Path, prefix: str, sig: int) -> subprocess.CompletedProcess:
    """Run the CLI, send `sig` once a `prefix`* folder appears in `folder`, wait for it."""
    # SIGINT back to its default: a suite started in the background (`&`, nohup) passes it on ignored.
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
    from edgekit.progress import STAGE_PREFIX

    errors = [line for line in result.stderr.strip().splitlines() if not line.startswith(STAGE_PREFIX)]
    assert errors == ["edgekit: error: interrupted"]
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


def test_a_core_ml_conversion_killed_midway_leaves_nothing_that_looks_finished(tmp_path, tiny_e2b_4layers):
    """kill -9 while coremltools converts the decoder: only marked scratch folders remain, and
    the next export's sweep removes them."""
    pytest.importorskip("coremltools")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "b.edgekit"
    argv = ["export", str(tiny_e2b_4layers), "--device", "iphone-15-pro", "--modalities", "text", "-o", str(target)]
    _interrupt_when(argv, out, ".b.edgekit.raw-", signal.SIGKILL)  # made just before the conversion
    left = sorted(p.name for p in out.iterdir())
    assert "b.edgekit" not in left and left and all(TEMP_MARK in n or RAW_MARK in n for n in left), left
    sweep_stale(target)
    assert list(out.iterdir()) == []


def test_a_killed_make_checkpoint_is_swept_by_the_next(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # The killed run writes a full-width checkpoint so that it is still writing when the signal lands.
    killed = ["make-checkpoint", "e2b-shape", str(out / "ck"), "--layers", "2"]
    _interrupt_when(killed, out, ".ck.tmp-", signal.SIGKILL)
    assert run_cli("make-checkpoint", "tiny-e2b", str(out / "ck"), "--layers", "2").returncode == 0
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
    with pytest.raises(InputError, match="already exists"):
        write_bundle(target)  # the sweep put it back, and it is not overwritten unasked
    assert load_bundle(target).manifest.device == "pi5"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    sweep_stale(target)
    assert not aside.exists() and target.is_dir()


# --- resources ---------------------------------------------------------------------------


@pytest.mark.parametrize("threads", ["0", "-2", str(usable_cpus() + 1), "1000000"])
def test_threads_beyond_the_machine_are_refused(onnx_fp32_bundle, threads):
    for command in (["run", "-p", "Hi"], ["bench"]):
        result = run_cli(command[0], str(onnx_fp32_bundle), *command[1:], "--threads", threads, timeout=120)
        assert_clean_failure(result, code=2, contains=f"--threads must be between 1 and {usable_cpus()}")
    assert run_cli("run", str(onnx_fp32_bundle), "-p", "Hi", "--max-new-tokens", "1", "--threads",
                   str(usable_cpus())).returncode == 0


def test_an_export_whose_cache_exceeds_the_machine_is_refused_before_loading(tmp_path, tiny_e2b):
    """A config that allows a 500-million-token context and --force past the device's budget:
    the program's KV cache would be tens of GB, allocated while exporting."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_e2b, ck)
    config = json.loads((ck / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 500_000_000
    (ck / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    result = run_cli("export", str(ck), "--device", "android-flagship", "--context", "500000000", "--force",
                     "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=2, contains="-token KV cache this export builds needs")
    assert "more than this machine's" in result.stderr and time.monotonic() - started < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_checkpoint_whose_shards_exceed_the_machine_is_refused():
    """The largest shard is generated whole and copied once more when serialized."""
    from edgekit.checkpoint_output import check_memory_for_shards
    from edgekit.machine import memory_bytes

    check_memory_for_shards([2 * 1024**3, 1024])
    with pytest.raises(InputError, match="writing the largest weight shard needs .* GB, more than this machine's"):
        check_memory_for_shards([memory_bytes()])


def test_an_output_place_that_takes_no_files_is_an_input_error_before_any_work(tiny_e2b, tmp_path):
    """-o under a file, under /proc, on a read-only mount: one line, exit 2, before the
    checkpoint loads (these were internal errors after the load)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    places = {a_file / "b.edgekit": "is not a folder", Path("/proc/b.edgekit"): "does not take new files"}
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(tmp_path / "read-only"), str(read_only)],
                             capture_output=True).returncode == 0
    try:
        if mounted and subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only)],
                                      capture_output=True).returncode == 0:
            places[read_only / "b.edgekit"] = "does not take new files (Read-only file system)"
        for out, message in places.items():
            result = run_cli("export", str(tiny_e2b), "--device", "pi5-8gb", "-o", str(out))
            assert_clean_failure(result, code=2, contains=message)
            assert "Loading the checkpoint" not in result.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], capture_output=True)
    assert a_file.read_text() == "mine" and not list(tmp_path.glob(".edgekit-probe-*"))
