"""The runners hand freed C-heap memory back after a prefill (runtimes/free_heap.py)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

from edgekit.bundle import load_bundle
from edgekit.runtimes.free_heap import release_free_heap

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")


def _rss_anon_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@glibc_only
def test_freed_heap_blocks_go_back_to_the_kernel():
    """64 MiB of freed 64 KiB blocks (below glibc's mmap threshold, so heap memory) stay
    resident under a live block above them until release_free_heap."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024
    blocks = [libc.malloc(block) for _ in range(1024)]
    pin = libc.malloc(block)  # keeps the freed blocks off the heap's top, which free() trims itself
    for b in blocks:
        ctypes.memset(b, 1, block)
    for b in blocks:
        libc.free(b)
    held = _rss_anon_kib()
    assert release_free_heap()
    released = held - _rss_anon_kib()
    libc.free(pin)
    assert released > 48 * 1024, f"released {released} KiB of 64 MiB"


def test_onnx_runner_releases_the_heap_after_a_prefill_only(onnx_fp32_bundle, monkeypatch):
    from edgekit.runtimes.backends import onnx_backend

    calls = []
    monkeypatch.setattr(onnx_backend, "release_free_heap", lambda: calls.append(1) or True)
    backend = onnx_backend.OnnxBackend(load_bundle(onnx_fp32_bundle))
    logits = backend.forward(np.array([2, 10, 11, 12], np.int64))
    assert len(calls) == 1
    backend.forward(np.array([int(logits[-1].argmax())], np.int64))
    assert len(calls) == 1  # a decode step allocates little: no call


def test_executorch_runner_releases_the_heap_after_a_prefill_only(executorch_bundles, monkeypatch):
    from edgekit.runtimes.backends import executorch_backend, open_backend

    calls = []
    monkeypatch.setattr(executorch_backend, "release_free_heap", lambda: calls.append(1) or True)
    backend = open_backend(executorch_bundles["fp32"])
    logits = backend.forward(np.array([2, 10, 11, 12], np.int64))
    assert len(calls) == 1
    backend.forward(np.array([int(logits[-1].argmax())], np.int64))
    assert len(calls) == 1
