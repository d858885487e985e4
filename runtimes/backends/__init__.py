"""Device backends, one module per format; the formats table (edgekit.formats) names each."""

from __future__ import annotations

from edgekit.bundle import Bundle
from edgekit.formats import get_format
from edgekit.machine import check_threads
from edgekit.runtimes.backends.base import Backend

__all__ = ["Backend", "open_backend"]


def open_backend(bundle: Bundle, *, providers: tuple[str, ...] | None = None, threads: int | None = None) -> Backend:
    threads = check_threads(threads)
    backend_class = get_format(bundle.manifest.format).load_runtime()
    return backend_class(bundle, providers=providers, threads=threads)
