"""Host-side exporters (needs `gemma-edgekit[export]`): importable as edgekit.export.

One folder per format (onnx/, executorch/); the formats table (edgekit.formats) names
each format's exporter, and `exporter_for` looks it up there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgekit.formats import get_format

if TYPE_CHECKING:
    from edgekit.bundle import Bundle
    from edgekit.checkpoint import Checkpoint
    from edgekit.plan import ExportPlan


class Exporter(Protocol):
    """What every format's exporter is: the plan has decided everything (format, backend,
    recipe, context, modalities); the exporter writes `output` atomically and returns the
    loaded bundle."""

    def __call__(self, checkpoint: Checkpoint, *, plan: ExportPlan, output: Path,
                 overwrite: bool = False) -> Bundle: ...


def exporter_for(format_name: str) -> Exporter:
    return get_format(format_name).load_exporter()
