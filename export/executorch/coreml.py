"""ExecuTorch's Core ML partitioner, set up for edgekit's methods (iphone / mac profiles).

The ahead-of-time step runs on Linux (executorch 1.5.1, coremltools 9.0): the backend's
preprocess is coremltools' ct.convert to an ML program, saved as an .mlpackage inside the
.pte (model_type MODEL; Core ML compiles it on the device at first load). Running the
program needs Apple's Core ML runtime: executorch.runtime on Linux answers "Backend
CoreMLBackend is not registered", and model_type COMPILED_MODEL (an .mlmodelc made at
export time) fails off macOS ("This model was not loaded or compiled with the Core ML
Framework").

Two fixes make the text_decoder one Core ML delegate with its KV caches as Core ML states:

1. StaticKVDecoder's `index_copy_(2, slots, k)` reaches coremltools as
   index_put(cache, [None, None, slots], k), which coremltools 9.0 only converts for a
   single slot ("Input squeeze_0 has rank 1 != other inputs rank 0"). The converter below
   takes the [None]*k + [1-D index] case to MIL `scatter` along axis k (index_copy exactly)
   and leaves every other index_put to coremltools.
2. to_edge recomputes the programs' range constraints from the shape environment, which
   turns the declared seq_len range 1..N into 2..N; coremltools copies that into the Core
   ML input shape range, so a one-token decode call would be refused on the device. The
   partitioner puts the torch.export ranges back (pass `range_constraints`).

Export Core ML methods without export/executorch/xnnpack_modules.py's swaps: coremltools'
fuse_linear_bias pass fails on XnnpackRMSNorm ("IndexError: tuple index out of range").
Core ML states are fp16 whatever the compute precision (coremltools casts the caches).
"""

from __future__ import annotations

from edgekit.errors import ExportError, require

IOS_TARGETS = ("18", "26")  # Core ML states (the KV caches) need iOS 18 / macOS 15 or later


def coreml_partitioner(*, ios_target: str = "18", range_constraints: dict | None = None,
                       precision: str = "float16") -> object:
    """A CoreMLPartitioner (ML program, minimum deployment target iOS `ios_target`, mutable
    buffers taken over as Core ML states). `range_constraints`: the torch.export program's
    own (ExportedProgram.range_constraints), restored before partitioning."""
    if ios_target not in IOS_TARGETS:
        raise ExportError(f"Core ML target iOS {ios_target} is not supported: the KV cache needs "
                          f"Core ML states (one of iOS {', '.join(IOS_TARGETS)})")
    if precision not in ("float16", "float32"):
        raise ExportError(f"Core ML compute precision must be float16 or float32, got {precision!r}")
    ct = require("coremltools", extra="export")
    try:
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as exc:
        raise ExportError(f"ExecuTorch's Core ML backend does not import: {exc}") from exc
    _register_index_copy_converter()
    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=getattr(ct.target, f"iOS{ios_target}"),
        compute_precision=ct.precision(precision),
        model_type=CoreMLBackend.MODEL_TYPE.MODEL,
    )
    declared = {str(k): v for k, v in (range_constraints or {}).items()}

    class _Partitioner(CoreMLPartitioner):
        def partition(self, exported_program):
            exported_program._range_constraints = {
                k: declared.get(str(k), v) for k, v in exported_program.range_constraints.items()}
            return super().partition(exported_program)

    return _Partitioner(compile_specs=specs)


def _register_index_copy_converter() -> None:
    """Convert index_put(x, [None]*k + [idx], v) (idx 1-D, not accumulating) to MIL scatter."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.mil import types

    stock = _TORCH_OPS_REGISTRY.get_func("index_put")
    if getattr(stock, "edgekit_index_copy", False):
        return

    def index_put(context, node):
        inputs = ops._get_inputs(context, node, expected=(3, 4))
        x, indices, values = inputs[0], inputs[1], inputs[2]
        accumulate = ops._get_kwinputs(context, node, "accumulate",
                                       default=[inputs[3] if len(inputs) > 3 else False])[0]
        index = indices[-1] if isinstance(indices, list) and len(indices) > 1 else None
        if (getattr(accumulate, "val", accumulate) or index is None or index.rank != 1
                or index.shape[0] == 1 or any(i is not None for i in indices[:-1])):
            return stock(context, node)  # coremltools handles these itself
        if index.dtype != types.int32:
            index = mb.cast(x=index, dtype="int32")
        context.add(mb.scatter(data=x, indices=index, updates=values, axis=len(indices) - 1,
                               mode="update", name=node.name))

    index_put.edgekit_index_copy = True
    register_torch_op(index_put, override=True)
