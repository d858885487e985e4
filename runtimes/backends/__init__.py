"""Device backends, picked from the bundle manifest's format."""

from __future__ import annotations

from edgekit.bundle import Bundle
from edgekit.errors import BundleError, NotAvailableError
from edgekit.machine import check_threads
from edgekit.runtimes.backends.base import Backend

__all__ = ["Backend", "open_backend"]


def open_backend(bundle: Bundle, *, providers: tuple[str, ...] | None = None, threads: int | None = None) -> Backend:
    threads = check_threads(threads)
    fmt = bundle.manifest.format
    if fmt == "onnx":
        from edgekit.runtimes.backends.onnx_backend import OnnxBackend

        return OnnxBackend(bundle, providers=providers, threads=threads)
    if fmt == "executorch":
        try:
            from edgekit.runtimes.backends.executorch_backend import ExecutorchBackend
        except ImportError as exc:
            raise NotAvailableError(f"the ExecuTorch backend has not landed yet ({exc})") from None
        return ExecutorchBackend(bundle, threads=threads)
    if fmt == "coreml":
        raise NotAvailableError("Core ML bundles run on Apple devices through the Core ML runtime, not this runner")
    raise BundleError(f"bundle {bundle.path} has unknown format {fmt!r}")
