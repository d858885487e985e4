"""Resident pages of memory-mapped bundle files (Linux): give back those the process will not
read again, and keep table lookups from reading around the rows they need.

onnxruntime maps each external-data initializer of a graph (one private mapping per tensor)
and `MatMulNBits` reads its weights and scales once, to prepack them into its own buffers.
What runs afterwards is the prepacked copy, but the pages that were read stay resident and
count in RSS: the fp32 scales of a full-depth E2B int4 decoder are 271 MiB
(bench/RESULTS.md section 9). `MADV_DONTNEED` on those mappings drops the pages; a page read
again is faulted back in from the file, so nothing changes but the RSS. Mappings holding
copy-on-write pages are left alone (dropping those would lose what was written).
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MADV_RANDOM = 1
MADV_DONTNEED = 4
# A mapping's header line in smaps: range, perms, offset, device, inode, then the path (none
# for anonymous memory).
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+(?:\s+(.*))?$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str
    resident_bytes: int
    private_copies_bytes: int  # "Anonymous:" in smaps: pages written since the mapping was made


def mappings(smaps: Path = Path("/proc/self/smaps")) -> list[Mapping]:
    """Every file-backed mapping of this process, from /proc/self/smaps ([] where unreadable)."""
    found, current = [], None
    try:
        lines = smaps.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        header = _HEADER.match(line)
        if header:
            path = (header.group(3) or "").strip()
            current = None
            if path.startswith("/"):
                current = {"start": int(header.group(1), 16), "end": int(header.group(2), 16), "path": path,
                           "resident_bytes": 0, "private_copies_bytes": 0}
                found.append(current)
        elif current is not None:
            key, _, value = line.partition(":")
            if key == "Rss":
                current["resident_bytes"] = int(value.split()[0]) * 1024
            elif key == "Anonymous":
                current["private_copies_bytes"] = int(value.split()[0]) * 1024
    return [Mapping(**m) for m in found]


def file_mappings(path: Path) -> list[Mapping]:
    """This process's mappings of `path`."""
    wanted = str(Path(path).resolve())
    return [m for m in mappings() if m.path == wanted]


def release_file_pages(path: Path) -> int:
    """Drop this process's resident pages of `path`'s mappings that hold no written pages;
    returns the resident bytes released (0 off Linux, or where madvise is refused)."""
    libc = linux_libc()
    if libc is None:
        return 0
    released = 0
    for mapping in file_mappings(path):
        if mapping.private_copies_bytes or not mapping.resident_bytes:
            continue
        if libc.madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
            released += mapping.resident_bytes
    return released


def advise_random_access(path: Path) -> int:
    """Mark this process's mappings of `path` MADV_RANDOM; returns how many were marked.

    A page fault on a file mapping otherwise reads ahead around the page (128 KiB) and maps
    what it read: one looked-up embedding row made ~0.2 MiB of a table resident, the PLE
    table's rows a few KiB each (bench/RESULTS.md sections 1 and 12). Random ids are what
    token lookups are; pages already resident stay."""
    libc = linux_libc()
    if libc is None:
        return 0
    return sum(libc.madvise(m.start, m.end - m.start, MADV_RANDOM) == 0 for m in file_mappings(path))


@functools.cache
def linux_libc():
    """The C library, for madvise; None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
