"""Where `make-checkpoint` writes: the checks on its output folder, its temporary folder
beside it, and how the finished folder is marked as edgekit's before it is renamed into place.

The same rules as a bundle's: a killed run's leftovers are swept, the folder gets the
permissions of any new folder (umask), and --overwrite replaces only what edgekit wrote.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.bundle import default_modes
from edgekit.errors import InputError
from edgekit.machine import check_memory
from edgekit.overwrite_guard import check_replaceable, checkpoint_record, write_checkpoint_marker
from edgekit.scratch_dirs import TEMP_MARK, make_sibling_dir, sweep_stale


def check_checkpoint_target(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that holds anything, unless overwrite and make-checkpoint wrote
    all of it. First sweeps what a killed run for it left beside it."""
    sweep_stale(out_dir)
    if out_dir.is_symlink():
        raise InputError(f"refusing to write a checkpoint at {out_dir}: it is a link; give the folder it points to")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{out_dir} already exists and is not empty (pass --overwrite to replace it)")
    check_replaceable(out_dir, written=checkpoint_record(out_dir), what="make-checkpoint folder", error=InputError)


def make_checkpoint_temp_dir(out_dir: Path) -> Path:
    """The folder the checkpoint is written in, beside out_dir (one rename publishes it)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return make_sibling_dir(out_dir, TEMP_MARK)
    except OSError as exc:  # a read-only place, or a file where a folder should be
        raise InputError(f"cannot write a checkpoint in {out_dir.parent}: {exc.strerror or exc}") from None


def finish_checkpoint_dir(folder: Path) -> None:
    """Give every file the permissions of a new file (safetensors writes its weights 0600)
    and record them as make-checkpoint's."""
    write_checkpoint_marker(folder)
    default_modes(folder, sorted(p.name for p in folder.iterdir() if p.is_file()))


def check_memory_for_shards(shard_bytes: list[int]) -> None:
    """A shard is generated whole and then serialized, which copies it: twice the largest
    shard (a single tensor may exceed the shard limit: E2B's per-layer table is 4.7 GB)."""
    check_memory("writing the largest weight shard", 2 * max(shard_bytes, default=0))
