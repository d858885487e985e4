"""Every entry under a folder, found without following a link."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator


def walk_entries(root: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative "/" path, entry) of every entry under root that is not a folder, a link to a
    folder included; folders are entered, links never. An unreadable folder raises OSError."""
    stack = [""]
    while stack:
        prefix = stack.pop()
        with os.scandir(root / prefix if prefix else root) as it:
            found = list(it)
        for entry in found:
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            else:
                yield rel, entry
