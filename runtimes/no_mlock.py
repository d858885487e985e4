"""Keep ExecuTorch's Python runtime from locking a whole program into RAM when run as root.

The bindings map a `.pte` with MmapDataLoader(UseMlockIgnoreErrors): for a process with
CAP_IPC_LOCK (root, the usual case on a robot or in a container) mlock succeeds and every
constant segment it loads stays resident for good — the per-layer table included, which is
most of an E2B bundle and of which a token reads a few rows (360 MiB locked for a 4-layer
8da4w-emb4 bundle here). Without the capability, mlock is held to RLIMIT_MEMLOCK (8 MiB by
default), fails, is ignored, and the weights stay mapped on demand, as on a phone.

`mlock_disabled()` clears CAP_IPC_LOCK from the calling thread's effective set (capabilities
are per thread; ExecuTorch loads on the caller's) and restores it afterwards.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

from edgekit.runtimes.mapped_pages import linux_libc

CAP_IPC_LOCK = 14
_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc():
    """The C library where it has capget and capset (glibc, musl), else None."""
    libc = linux_libc()
    return libc if libc is not None and hasattr(libc, "capget") and hasattr(libc, "capset") else None


def _capabilities() -> tuple[_Header, ctypes.Array] | None:
    libc = _libc()
    if libc is None:
        return None
    header, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return None
    return header, data


def ipc_lock_effective() -> bool:
    """Whether this thread may lock memory past RLIMIT_MEMLOCK."""
    caps = _capabilities()
    return bool(caps and caps[1][0].effective & (1 << CAP_IPC_LOCK))


@contextmanager
def mlock_disabled() -> Iterator[None]:
    """Run the block without CAP_IPC_LOCK in this thread's effective set (a no-op where the
    thread does not have it, or off Linux)."""
    caps = _capabilities()
    if caps is None or not caps[1][0].effective & (1 << CAP_IPC_LOCK):
        yield
        return
    header, data = caps
    saved = data[0].effective
    data[0].effective &= ~(1 << CAP_IPC_LOCK)
    dropped = _libc().capset(ctypes.byref(header), data) == 0
    try:
        yield
    finally:
        if dropped:
            data[0].effective = saved
            _libc().capset(ctypes.byref(header), data)
