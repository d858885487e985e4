"""torch.export every method, lower them all to XNNPACK in one call, write one .pte.

    MethodBuild ─► swap_rms_norms ─► torch.export(strict=True) ─┐
    MethodBuild ─► ...                                          ├─► to_edge_transform_and_lower
    constant (metadata) methods ────────────────────────────────┘      (XNNPACK partitioners per method)
        ─► to_executorch (quant fusion + const prop, reinplace, sym-shape memory planning) ─► .pte

Settings that work with executorch 1.5.1 / torch 2.13 (shared/EXPORT-NOTES.md): strict export
(non-strict programs fail in lowering); the dynamically quantized partitioner before the
plain one; quant fusion and constant propagation (quantized embedding lookups need them);
graph inputs not memory planned; sym-shape evaluation by constraints (the dynamic seq_len).
The reinplace pass turns the KV caches' index_put into an in-place write.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgekit.errors import ExportError
from edgekit.export.executorch.methods import MethodBuild
from edgekit.export.executorch.xnnpack_rms_norm import swap_rms_norms


def export_method(build: MethodBuild) -> "torch.export.ExportedProgram":
    """strict torch.export of one method (its norms swapped for XNNPACK-friendly ones)."""
    module = swap_rms_norms(build.module, build.example_inputs)
    reset = getattr(getattr(build.module, "decoder", None), "reset_cache", None)
    if reset is not None:
        reset()  # the width-recording forward wrote sample K/V into the caches
    try:
        with torch.no_grad():
            return torch.export.export(module, build.example_inputs, dynamic_shapes=build.dynamic_shapes, strict=True)
    except Exception as exc:  # torch.export raises many types; the method name is what a user needs
        raise ExportError(f"torch.export of {build.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def _partitioners(dynamic_quant: bool) -> list:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner, XnnpackPartitioner,
    )

    return [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()] if dynamic_quant else [XnnpackPartitioner()]


def lower_to_pte(programs: dict[str, "torch.export.ExportedProgram"], *, dynamic_quant: dict[str, bool],
                 constant_methods: dict, out: Path) -> dict[str, int]:
    """Lower `programs` (by method name) in one call and write the .pte to `out`.

    Returns the number of XNNPACK delegates per method (a fragmented partition is slow).
    """
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.exir.capture._config import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    try:
        edge = to_edge_transform_and_lower(
            programs,
            partitioner={name: _partitioners(dynamic_quant[name]) for name in programs},
            constant_methods=constant_methods,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        delegates = {name: sum(1 for n in edge.exported_program(name).graph.nodes
                               if n.op == "call_function" and "call_delegate" in str(n.target))
                     for name in programs}
        program = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            run_reinplace_pass=True,
        ))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"lowering to ExecuTorch failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    with open(out, "wb") as fh:
        program.write_to_file(fh)
    return delegates
