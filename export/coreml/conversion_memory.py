"""What a Core ML export needs in host memory, so `edgekit plan` / `export` refuse what will not fit.

The model is loaded as stored (bf16: 2 bytes per parameter), the per-layer table is written
to its row file a block at a time and dropped, and only the text decoder is upcast to fp32
for tracing (its head as a copy in the program's precision). While coremltools converts and
compresses the decoder, its MIL constants and their fp16 / int4 copies add about
CONVERSION_BYTES_PER_PARAMETER per decoder parameter; no constant is handled whole at more
than a few hundred MB (decoder.SplitHead). The encoders convert after the decoder is gone.
Measured: bench/RESULTS.md, Core ML section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekit.manifest import METHOD_TEXT_DECODER
from edgekit.models.family import PER_LAYER_EMBEDDING

if TYPE_CHECKING:
    from edgekit.plan import ExportPlan

BASE_BYTES = 10**9  # Python, torch and coremltools themselves
STORED_BYTES_PER_PARAMETER = 2  # bf16, as released
TRACED_BYTES_PER_PARAMETER = 4  # fp32
# Measured (bench/RESULTS.md section 17): full E2B, every tower, 22.84 GB peak RSS at
# int4-ple2, 22.66 at int4-ple2-t8, 21.56 at int4; e2b-shape cut to 2 layers, text, int4,
# 4.96 GB. This constant puts the estimates at 22.9 and 5.4 GB.
CONVERSION_BYTES_PER_PARAMETER = 5.2


def conversion_peak_bytes(plan: ExportPlan) -> int:
    """The text decoder's own parameters traced in fp32, its tied head copied in the program's
    precision, the rest (tables, towers) as stored, and coremltools' copies of the program."""
    parameters = {c.name: c.parameters for c in plan.components}
    decoder = parameters.get(METHOD_TEXT_DECODER, 0)
    program = {c.name: c.stored_parameters for c in plan.components}.get(METHOD_TEXT_DECODER, 0)
    head_bytes = 4 if plan.recipe.float_dtype == "fp32" else 2
    rest = plan.checkpoint_parameters - parameters.get(PER_LAYER_EMBEDDING, 0) - decoder
    return int(BASE_BYTES + STORED_BYTES_PER_PARAMETER * max(rest, 0) + TRACED_BYTES_PER_PARAMETER * decoder
               + head_bytes * (program - decoder) + CONVERSION_BYTES_PER_PARAMETER * program)
