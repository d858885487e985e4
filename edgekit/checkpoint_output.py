"""Where `make-checkpoint` writes: the checks on its output folder and its temporary folder
beside it, named for its process so a later run can sweep it if this one is killed.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import InputError
from edgekit.scratch_dirs import TEMP_MARK, make_sibling_dir, sweep_stale


def check_checkpoint_target(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that holds anything, unless overwrite and it is a checkpoint.
    First sweeps what a killed run for it left beside it."""
    sweep_stale(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir} already exists and is not empty (pass --overwrite to replace it)")
        # --overwrite replaces a checkpoint, never a folder the user keeps other things in.
        if not _is_checkpoint(out_dir):
            raise InputError(f"refusing to overwrite {out_dir}: it is not a Gemma 4 checkpoint (no gemma4 config.json)")


def _is_checkpoint(path: Path) -> bool:
    from edgekit.model import SUPPORTED_MODEL_TYPES

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("model_type") in SUPPORTED_MODEL_TYPES


def make_checkpoint_temp_dir(out_dir: Path) -> Path:
    """The folder the checkpoint is written in, beside out_dir (one rename publishes it)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return make_sibling_dir(out_dir, TEMP_MARK)
    except OSError as exc:  # a read-only place, or a file where a folder should be
        raise InputError(f"cannot write a checkpoint in {out_dir.parent}: {exc.strerror or exc}") from None
