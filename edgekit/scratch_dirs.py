"""The hidden folders edgekit makes beside an output, and the sweep of those a killed run left.

    .NAME.tmp-HOST-PID-XXXXXXXX    a bundle or checkpoint being written, renamed to NAME when done
    .NAME.raw-HOST-PID-XXXXXXXX    an ONNX export's graphs before quantization
    .NAME.old-HOST-PID-XXXXXXXX    the NAME being replaced, set aside until the new one is in place

A run removes its own on the way out (Ctrl-C and SIGTERM included). Only a run killed
outright (kill -9, the OOM killer, a power cut) leaves them, and for a full model they
hold gigabytes, so the next run for the same NAME sweeps them. The name says who owns
one: the pid, and a tag of the host, because an output folder on a network share can be
written from two machines whose pids mean nothing to each other. A folder is swept only
when its owner is this host's, that process is gone, and this user owns the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

TEMP_MARK = ".tmp-"
RAW_MARK = ".raw-"
OLD_MARK = ".old-"
_MARKS = (TEMP_MARK, RAW_MARK, OLD_MARK)
_OWNER = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def sibling_path(target: Path, mark: str) -> Path:
    """A fresh `.NAME<mark>HOST-PID-XXXXXXXX` path beside target (not created)."""
    return target.parent / f".{target.name}{mark}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def make_sibling_dir(target: Path, mark: str) -> Path:
    """Create a sibling folder of target named for this process; os.mkdir, not mkdtemp, so
    what is published from it gets the usual umask permissions rather than 0700."""
    while True:
        path = sibling_path(target, mark)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def is_scratch_name(name: str) -> bool:
    """Whether a folder name is one of these (of any owner, or an older edgekit's unowned ones)."""
    return name.startswith(".") and any(mark in name for mark in _MARKS)


def sweep_stale(target: Path) -> None:
    """Remove target's scratch folders whose run is gone. An `.old-` one with no target
    beside it is the user's previous NAME, set aside by a run killed before its new one
    was in place: it is put back, not removed. Never fails: what cannot be swept stays."""
    target = Path(os.path.abspath(target))
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    stale: dict[str, list[tuple[int, str]]] = {mark: [] for mark in _MARKS}
    for entry in entries:
        found = _stale(entry, target.name)
        if found is not None:
            mark, mtime_ns = found
            stale[mark].append((mtime_ns, entry.path))
    for _mtime, path in stale[TEMP_MARK] + stale[RAW_MARK]:
        shutil.rmtree(path, ignore_errors=True)
    for _mtime, path in sorted(stale[OLD_MARK], reverse=True):  # the newest is the one to put back
        if not (target.exists() or target.is_symlink()):
            try:
                os.rename(path, target)
                continue
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


def _stale(entry: os.DirEntry, name: str) -> tuple[str, int] | None:
    """(mark, mtime_ns) of a scratch folder of `name` whose owner is gone, else None."""
    for mark in _MARKS:
        prefix = f".{name}{mark}"
        if not entry.name.startswith(prefix):
            continue
        owner = _OWNER.fullmatch(entry.name[len(prefix):])
        if owner is None or owner["host"] != _host_tag() or _alive(int(owner["pid"])):
            return None
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
            return None
        return mark, st.st_mtime_ns
    return None


def _alive(pid: int) -> bool:
    """Whether process `pid` exists; in doubt, yes (a live run's folder must never go)."""
    if os.name != "posix" or pid <= 0:
        return True  # Windows' os.kill(pid, 0) would send Ctrl-C, not probe
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True
