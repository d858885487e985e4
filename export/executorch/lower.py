"""torch.export every method, lower them all in one call, write one .pte.

    MethodBuild ─► swap_for_xnnpack ─► torch.export(strict=True) ─┐
    MethodBuild ─► ...                                          ├─► to_edge_transform_and_lower
    constant (metadata) methods ────────────────────────────────┘      (a partitioner per method)
        ─► to_executorch (quant fusion + const prop, reinplace, sym-shape memory planning) ─► .pte

Settings that work with executorch 1.5.1 / torch 2.13 (docs/export-notes.md): strict export
(non-strict programs fail in lowering); the dynamically quantized partitioner before the
plain one; quant fusion and constant propagation (quantized embedding lookups need them);
graph inputs not memory planned; sym-shape evaluation by constraints (the dynamic seq_len).
The reinplace pass turns the KV caches' index_put into an in-place write.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.errors import ExportError
from edgekit.export.executorch.methods import MethodBuild
from edgekit.export.executorch.xnnpack_modules import swap_for_xnnpack
from edgekit.runtimes.native_logs import native_logs_hidden


def export_method(build: MethodBuild) -> "torch.export.ExportedProgram":
    """strict torch.export of one method, norms and tanh-GELU swapped for ones XNNPACK takes whole."""
    with native_logs_hidden():  # the swaps run a sample forward: eager LLM custom ops log each call
        module = swap_for_xnnpack(build.module, build.example_inputs)
    reset = getattr(getattr(build.module, "decoder", None), "reset_cache", None)
    if reset is not None:
        reset()  # the width-recording forward wrote sample K/V into the caches
    try:
        with torch.no_grad():
            return torch.export.export(module, build.example_inputs, dynamic_shapes=build.dynamic_shapes, strict=True)
    except Exception as exc:  # torch.export raises many types; the method name is what a user needs
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(f"torch.export of {build.name} failed: {type(exc).__name__}: {first}") from exc


def xnnpack_partitioner():
    """One XnnpackPartitioner with every precision enabled (fp32 and dynamically quantized).

    ExecuTorch's gemma4 example passes [XnnpackDynamicallyQuantizedPartitioner(),
    XnnpackPartitioner()]; that puts every quantized linear in a delegate of its own (tiny
    E2B 8da4w decoder: 278 delegates, 248 s to lower) where one partitioner makes 24 (156 s),
    with the same outputs.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner()


@dataclass(frozen=True)
class LoweredMethod:
    delegates: dict[str, int]  # delegate calls by backend (a fragmented partition is slow to lower and run)
    kernels: tuple[str, ...]  # operators left to ExecuTorch's kernel libraries (the app must link them)
    planned_bytes: int  # memory-planned activations: a runtime allocates this when it loads the method


def tag_weights_external(program: "torch.export.ExportedProgram", tag: str) -> None:
    """Mark every weight of `program` (parameters, constant buffers, lifted constants; not the
    KV caches it mutates) for the `tag`.ptd file: the XNNPACK delegate then stores what it
    packs under that tag in ExecuTorch's named data instead of inside the .pte. Measured with
    executorch 1.5.1: fp32 weights move; torchao-quantized ones reach XNNPACK's serializer
    without the tag and stay in the .pte (full-depth E2B 8da4w: 1.8 GB)."""
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    weights = (set(signature.inputs_to_parameters) | set(signature.inputs_to_lifted_tensor_constants)
               | {name for name, buffer in signature.inputs_to_buffers.items() if buffer not in mutated})
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


class ExternalConstantTags:
    """ExecuTorch's `external_constants` callable for the weights left outside delegates (the
    quantized embedding tables): tag a constant of MIN_BYTES or more for the .ptd the first
    time its name appears. The .ptd keys such constants by name, and names like
    `_prop_tensor_constant0` recur in every method: a second method's tensor under the same key
    fails to load (InvalidExternalData), so later ones stay in the .pte."""

    MIN_BYTES = 64 << 10

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._seen: set[str] = set()

    def __call__(self, node: "torch.fx.Node") -> str | None:
        name, value = str(node.target), node.meta.get("val")
        first = name not in self._seen
        self._seen.add(name)
        big = isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= self.MIN_BYTES
        return self.tag if first and big else None


def lower_to_pte(programs: dict[str, "torch.export.ExportedProgram"], *, constant_methods: dict,
                 out: Path, partitioners: dict[str, list] | None = None,
                 external_weights: bool = False) -> dict[str, LoweredMethod]:
    """Lower `programs` (by method name) in one call and write the .pte to `out`.
    `partitioners` by method name (default: XNNPACK for every method). `programs` is consumed:
    emptied once lowered, so their weights are freed before the emitter copies the rest.
    `external_weights`: weights go to `out`.ptd beside it (ExecuTorch's named data: a runtime
    loads the .pte with that data file): those outside delegates (the quantized embedding
    tables) and fp32 delegates' weights; see tag_weights_external."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.exir.capture._config import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    names = list(programs)
    tag = out.stem if external_weights else None
    if tag:
        for program in programs.values():
            tag_weights_external(program, tag)
    try:
        edge = to_edge_transform_and_lower(
            programs,
            partitioner={name: (partitioners or {}).get(name) or [xnnpack_partitioner()] for name in programs},
            constant_methods=constant_methods,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        programs.clear()  # the delegates hold serialized copies of what they took
        gc.collect()
        program = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            run_reinplace_pass=True,
            external_constants=ExternalConstantTags(tag) if tag else False,
        ))
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(f"lowering to ExecuTorch failed: {type(exc).__name__}: {first}") from exc
    with open(out, "wb") as fh:
        program.write_to_file(fh)
    if tag:
        program.write_tensor_data_to_file(str(out.parent))  # -> out.ptd
    planned = {plan.name: sum(plan.non_const_buffer_sizes) for plan in program.executorch_program.execution_plan}
    return {name: _summary(program.exported_program(name), planned[name]) for name in names}


def _summary(ep, planned_bytes: int) -> LoweredMethod:
    delegates: dict[str, int] = {}
    kernels = set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if "call_delegate" in str(node.target):
            backend = getattr(ep.graph_module, node.args[0].target).backend_id
            delegates[backend] = delegates.get(backend, 0) + 1
        elif isinstance(node.target, torch._ops.OpOverload) or hasattr(node.target, "_schema"):
            kernels.add(str(node.target._schema.name))
    return LoweredMethod(delegates, tuple(sorted(kernels)), planned_bytes)
