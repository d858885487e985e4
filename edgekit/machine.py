"""What this machine can give: CPUs for --threads, memory for what a file asks to allocate.

Numbers that size an allocation or a thread pool come from the command line, a manifest
or a config, and a typo or a crafted file can ask for a million threads or tens of GB.
They are checked here before anything is allocated, so the answer is one line, not an
OOM kill or a machine swapping itself to a halt.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.errors import EdgekitError, InputError

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int | None:
    """threads, if it is None (the runtime's default) or 1 to usable_cpus(); InputError otherwise."""
    if threads is None:
        return None
    cpus = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise InputError(f"--threads must be between 1 and {cpus} (the CPUs this machine gives edgekit); "
                         f"got {threads!r}")
    return threads


def memory_bytes() -> int | None:
    """Physical memory, or the container's limit when lower; None when it cannot be read."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" means no limit
            sizes.append(int(text))
    sizes = [s for s in sizes if s > 0]
    return min(sizes) if sizes else None


def check_memory(what: str, nbytes: int, *, error: type[EdgekitError] = InputError) -> None:
    """Raise `error` if `what` would need more than this machine's memory."""
    total = memory_bytes()
    if total is not None and nbytes > total:
        raise error(f"{what} needs {nbytes / 1e9:.1f} GB, more than this machine's {total / 1e9:.1f} GB of memory")
