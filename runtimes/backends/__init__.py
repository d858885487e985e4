"""Device backends, one module per format; the formats table (edgekit.formats) names each."""

from __future__ import annotations

from edgekit.bundle import Bundle
from edgekit.formats import get_format
from edgekit.machine import check_threads
from edgekit.runtimes.backends.base import Backend

__all__ = ["Backend", "open_backend"]


def open_backend(bundle: Bundle, *, providers: tuple[str, ...] | None = None, threads: int | None = None,
                 verifying: bool = False) -> Backend:
    """The bundle's runtime backend; `verifying`: what `edgekit verify` checks it with (a format
    whose runtime needs other hardware may evaluate its programs instead of running them)."""
    threads = check_threads(threads)
    fmt = get_format(bundle.manifest.format)
    backend_class = fmt.load_verify_runtime() if verifying else fmt.load_runtime()
    return backend_class(bundle, providers=providers, threads=threads)
