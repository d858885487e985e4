"""A bundle's files on disk, checked on every load before a runtime opens any of them.

Layout: every listed file is a regular file reached without following a link, and the
bundle holds nothing else but hidden files (a desktop's .DS_Store), and no link. A link could point
anywhere (a chat template linked to /etc/passwd would be rendered into the prompt), a
FIFO would hang the reader, and an unlisted file is one nothing vouches for.

Contents: every size, then every sha256 against the manifest. A file is read whole only
when edgekit.integrity_cache has no record of it in its current state, so the first
open of a bundle hashes it and later opens cost a stat per file. The hash is taken
through the same open file the stat described, and remembered only if the file did not
change while it was read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from edgekit.errors import BundleError
from edgekit.folder_walk import walk_entries
from edgekit.integrity_cache import IntegrityCache, file_key
from edgekit.manifest import MANIFEST_FILE, FileEntry

_CHUNK = 1 << 20  # 1 MiB reads: large enough for full disk speed, small enough to stream
_PROGRESS_MIN_BYTES = 256 << 20  # below this hashing takes well under a second: no bar
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def check_layout(root: Path, entries: Sequence[FileEntry]) -> dict[str, os.stat_result]:
    """Each listed file's lstat; BundleError for a link, a special or missing file, or a
    file the manifest does not list."""
    stats = {entry.path: _lstat_inside(root, entry.path) for entry in entries}
    try:
        found = list(walk_entries(root))
    except OSError as exc:
        raise BundleError(f"bundle folder {exc.filename or root} cannot be read: {exc.strerror or exc}") from None
    for rel, entry in found:
        if entry.is_symlink():  # hidden or not: nothing in a bundle may lead out of it
            raise BundleError(f"bundle file {rel} is a link; a bundle holds its own files, copy it in instead")
        if rel in stats or rel == MANIFEST_FILE or any(part.startswith(".") for part in rel.split("/")):
            continue  # listed, or hidden: a desktop's .DS_Store, a tool's own cache
        if not entry.is_file(follow_symlinks=False):
            raise BundleError(f"bundle file {rel} is not a regular file")
        raise BundleError(f"bundle file {rel} is not in the manifest, so nothing vouches for it")
    return stats


def _lstat_inside(root: Path, rel: str) -> os.stat_result:
    """lstat of root/rel, refusing a link at any step of the way."""
    parts = rel.split("/")
    path = root
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(f"bundle file {rel} is missing from {root}") from None
        except OSError as exc:
            raise BundleError(f"bundle file {rel} cannot be read: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            where = "" if i == len(parts) - 1 else f" (its folder {'/'.join(parts[:i + 1])} is)"
            raise BundleError(f"bundle file {rel} is a link{where}; a bundle holds its own files, copy it in instead")
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"bundle file {rel} is missing from {root}")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle file {rel} is not a regular file")
    return st


def check_contents(root: Path, entries: Sequence[FileEntry], stats: dict[str, os.stat_result], *,
                   level: str) -> None:
    """Sizes (all first: a truncated copy is reported without hashing), then for level
    "cached" or "full" the sha256 of each file ("cached": those the record does not vouch for)."""
    for entry in entries:
        size = stats[entry.path].st_size
        if size != entry.size:
            raise BundleError(f"bundle file {entry.path} is truncated or changed: {size} bytes != manifest {entry.size}")
    if level == "sizes":
        return
    record = IntegrityCache()
    todo = [e for e in entries
            if level == "full" or record.known(root / e.path, stats[e.path]) != e.sha256]
    try:
        with hash_progress(sum(e.size for e in todo), "Verifying bundle (MiB)") as advance:
            for entry in todo:
                path = root / entry.path
                actual, unchanged = _hash_as_stated(path, stats[entry.path], advance)
                if actual != entry.sha256:
                    raise BundleError(f"bundle file {entry.path} is corrupt: sha256 {actual} != manifest {entry.sha256}")
                if unchanged:
                    record.remember(path, stats[entry.path], actual)
    finally:
        record.save()


def remember_written(root: Path, entries: Sequence[FileEntry]) -> None:
    """Record the hashes a writer has just taken of the files it wrote and will not touch again."""
    record = IntegrityCache()
    for entry in entries:
        path = root / entry.path
        try:
            record.remember(path, os.lstat(path), entry.sha256, settled=True)
        except OSError:
            continue
    record.save()


def _hash_as_stated(path: Path, st: os.stat_result, advance: Callable[[float], None] | None) -> tuple[str, bool]:
    """(sha256, whether the file stayed as `st` describes while it was read)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        raise BundleError(f"bundle file {path.name} cannot be read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        before = os.fstat(fd)
        if (before.st_dev, before.st_ino) != (st.st_dev, st.st_ino):
            raise BundleError(f"bundle file {path.name} was replaced while it was being checked")
        digest = _sha256_of(fh, advance)
        after = os.fstat(fd)
    return digest, file_key(after) == file_key(st) == file_key(before)


def file_sha256(path: Path, advance: Callable[[float], None] | None = None) -> str:
    """sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    with open(path, "rb", buffering=0) as fh:
        return _sha256_of(fh, advance)


def _sha256_of(fh, advance: Callable[[float], None] | None) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        digest.update(view[:n])
        if advance is not None:
            advance(n / (1 << 20))
    return digest.hexdigest()


def hash_progress(total_bytes: int, description: str) -> ContextManager[Callable[[float], None] | None]:
    if total_bytes < _PROGRESS_MIN_BYTES:
        return contextlib.nullcontext(None)
    from edgekit.progress import progress_bar  # rich: only when a bar is worth showing

    return progress_bar(description, total_bytes / (1 << 20))
