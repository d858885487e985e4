"""Hand the C heap's free pages back to the kernel after a large call (glibc).

A prefill chunk or an encoder call allocates activations that are freed when it returns,
but glibc keeps freed blocks in its per-thread arenas (onnxruntime's and XNNPACK's worker
threads each allocate from their own), so they stay resident for the rest of a session:
55-58 MiB after each 128-token prefill of a 4-layer E2B int4 ONNX decoder, which a Pi then
carries through every decode step (bench/RESULTS.md section 11). `malloc_trim(0)` returns
the free pages of every arena; it took ~1 ms there. Decode steps allocate little, so they
are not worth a call.
"""

from __future__ import annotations

import ctypes
import functools

from edgekit.runtimes.mapped_pages import linux_libc


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (not Linux, or a C library without it, such as musl)."""
    libc = linux_libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Give the heap's free pages back; True when some were released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
