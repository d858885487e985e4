"""What `--overwrite` may delete: only a folder edgekit wrote, holding only what edgekit wrote there.

A bundle vouches for itself: its manifest.json lists every file. A checkpoint written by
`make-checkpoint` carries a hidden marker, MARKER_FILE, listing its files; a downloaded
checkpoint has none, and a gemma4 config.json alone says nothing about who wrote the
folder. Either way a file the list does not name (a user's notes, weights copied in) makes
the folder the user's, and it is refused. An empty folder holds nothing to lose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.folder_walk import walk_entries

MARKER_FILE = ".edgekit-checkpoint"
# Files a desktop's file browser drops into any folder it shows; nobody keeps data in them.
_DESKTOP_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def write_checkpoint_marker(folder: Path) -> None:
    """Record the files now in `folder` as make-checkpoint's."""
    files = sorted(rel for rel, _entry in walk_entries(folder))
    text = json.dumps({"written_by": "edgekit make-checkpoint", "edgekit_version": __version__, "files": files},
                      indent=2) + "\n"
    (folder / MARKER_FILE).write_text(text, encoding="utf-8")


def check_replaceable(folder: Path, *, written: set[str] | None, what: str, error: type[EdgekitError],
                      also_ours: Callable[[str], bool] = lambda rel: False) -> None:
    """Raise `error` unless `folder` is empty or holds only `written` (the relative paths
    edgekit's record lists; None: there is no record) and paths `also_ours` accepts (what
    edgekit may leave there that no record lists, such as a temporary file)."""
    try:  # links are not followed: removing one removes the link, never what it points to
        entries = list(walk_entries(folder))
    except OSError as exc:
        raise error(f"refusing to overwrite {folder}: {exc.filename or folder} cannot be read "
                    f"({exc.strerror or exc}), so what it holds is unknown") from None
    if not entries:
        return
    if written is None:
        raise error(f"refusing to overwrite {folder}: edgekit did not write it (it is not an edgekit {what}); "
                    "move it away or choose another output")
    for rel, entry in entries:
        name = rel.rsplit("/", 1)[-1]
        if (rel in written and not entry.is_symlink()) or also_ours(rel) or name in _DESKTOP_LITTER:
            continue
        raise error(f"refusing to overwrite {folder}: {rel} is not a file edgekit wrote there; "
                    "move it away or choose another output")


def checkpoint_record(folder: Path) -> set[str] | None:
    """The files make-checkpoint's marker lists, or None if the folder has no readable marker."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {*files, MARKER_FILE}
