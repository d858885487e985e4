"""The user's record of bundle files already hashed, so each is read whole only once.

A default load must catch a changed byte before the runtime reads it, and hashing a
multi-GB bundle at every start would take seconds. So a file is hashed the first time it is
opened, and its sha256 is remembered under what the file system says about it: the absolute
path with the device, inode, size, mtime and ctime. Writing a file changes its mtime and
ctime, replacing it changes its inode, and only the kernel sets ctime, so a change that
restores the old mtime (`touch -d`) is noticed too. Later opens cost one stat per file.

The record lives in $XDG_CACHE_HOME/edgekit (default ~/.cache/edgekit), private to the
user, who alone can vouch for it. When it cannot be read or written (a read-only home, a
full disk, another user's file) every open hashes every file, and nothing fails.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

RECORD_FILE = "verified-files.json"
_FORMAT = 1
# A file changed again within the file system's timestamp granularity of the stat it was
# hashed under would keep that stat: one this young is hashed each time until it settles.
_SETTLE_NS = 2_000_000_000
# Files remembered at most (a few per bundle); the oldest are forgotten first.
_MAX_ENTRIES = 4096

FileKey = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cache_dir() -> Path | None:
    """$XDG_CACHE_HOME/edgekit, or ~/.cache/edgekit (the XDG spec ignores a relative value)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory to be found
            return None
    return Path(base) / "edgekit"


class IntegrityCache:
    """`known(path, st)` -> the sha256 remembered for this exact file, or None;
    `remember(path, st, sha)` records one; `save()` writes what was recorded."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = cache_dir() if directory is None else directory
        self._entries: dict[str, list[Any]] = self._read()
        self._new: dict[str, list[Any]] = {}

    def _path(self) -> Path | None:
        return None if self.directory is None else self.directory / RECORD_FILE

    def _read(self) -> dict[str, list[Any]]:
        path = self._path()
        if path is None:
            return {}
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                # Only the user's own record, which no one else can write, vouches for a file.
                if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                    return {}
                data = json.loads(fh.read())
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 6}

    def known(self, path: Path, st: os.stat_result) -> str | None:
        entry = self._entries.get(str(path))
        if entry is None or tuple(entry[:5]) != file_key(st):
            return None
        return entry[5] if isinstance(entry[5], str) else None

    def remember(self, path: Path, st: os.stat_result, sha256: str, *, settled: bool = False) -> None:
        """settled: no one will write the file again (its writer hashed it when done), so a
        write within the clock's granularity cannot hide behind this stat."""
        if not settled and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _SETTLE_NS:
            return
        self._new[str(path)] = [*file_key(st), sha256]

    def save(self) -> None:
        """Add what was remembered to the record on disk (as another process may have left
        it since), atomically; any failure leaves it as it was."""
        path = self._path()
        if path is None or not self._new:
            return
        entries = self._read()
        for key, entry in self._new.items():
            entries.pop(key, None)  # re-inserted last: the newest are kept
            entries[key] = entry
        entries = dict(list(entries.items())[-_MAX_ENTRIES:])
        tmp = path.with_name(f".{RECORD_FILE}.{os.getpid()}.tmp")
        try:
            # 0700, as the XDG spec asks of a folder it creates for a user's data.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"format": _FORMAT, "files": entries}, fh)
            os.replace(tmp, path)
            self._entries, self._new = entries, {}
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
