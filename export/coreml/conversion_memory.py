"""What a Core ML export needs in host memory, so `edgekit plan` / `export` refuse what will not fit.

Measured (bench/RESULTS.md, Core ML section): e2b-shape cut to 2 layers, text, fp16, peaked at
17.2 GB resident: the float model (4 bytes per parameter, the per-layer table excepted: it is
written to its row file a block at a time and dropped) plus about 28 bytes per parameter of the
text decoder program while coremltools converts it (its MIL constants in fp32, their fp16
copies, the serialized weights), the tied lm_head included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekit.manifest import METHOD_TEXT_DECODER
from edgekit.models.family import PER_LAYER_EMBEDDING

if TYPE_CHECKING:
    from edgekit.plan import ExportPlan

FLOAT_MODEL_BYTES_PER_PARAMETER = 4
CONVERSION_BYTES_PER_PARAMETER = 28


def conversion_peak_bytes(plan: ExportPlan) -> int:
    stored = {c.name: c.stored_parameters for c in plan.components}
    tables = next((c.parameters for c in plan.components if c.name == PER_LAYER_EMBEDDING), 0)
    return (FLOAT_MODEL_BYTES_PER_PARAMETER * (plan.checkpoint_parameters - tables)
            + CONVERSION_BYTES_PER_PARAMETER * stored.get(METHOD_TEXT_DECODER, 0))
