"""Host-side exporters (needs `gemma-edgekit[export]`): importable as edgekit.export.

`exporter_for(format)` is the one place that maps a bundle format to its exporter;
each exporter takes (checkpoint, *, plan, output, overwrite) and returns the Bundle.
"""

from __future__ import annotations

from typing import Callable

from edgekit.errors import ExportError, NotAvailableError


def exporter_for(format_name: str) -> Callable:
    if format_name == "onnx":
        from edgekit.export.onnx.exporter import export_onnx

        return export_onnx
    if format_name == "executorch":
        try:
            from edgekit.export.executorch.exporter import export_executorch
        except ImportError as exc:
            raise NotAvailableError(f"the ExecuTorch exporter has not landed yet ({exc})") from None
        return export_executorch
    if format_name == "coreml":
        raise NotAvailableError("the standalone Core ML (.mlpackage) exporter has not landed yet; use --format "
                                "executorch (its Core ML delegate runs the text methods on iphone / mac profiles) or onnx")
    raise ExportError(f"no exporter for format {format_name!r}")
