"""coremltools converters for torch ops it lacks, registered before a torch.jit.trace conversion."""

from __future__ import annotations

from edgekit.errors import require


def register_index_copy() -> None:
    """torch `index_copy` / `index_copy_` -> MIL scatter(mode="update") along `dim`.

    coremltools 9.0 has no converter for it; on a registered buffer the in-place
    index_copy_ then becomes scatter + coreml_update_state (a KV-cache write into a Core ML
    state). Registering again replaces the converter (override=True), so repeated calls are safe.
    """
    require("coremltools", extra="export")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types

    def index_copy(context, node) -> None:
        x, dim, index, values = ops._get_inputs(context, node, expected=4)
        if index.dtype != types.int32:
            index = mb.cast(x=index, dtype="int32")
        context.add(mb.scatter(data=x, indices=index, updates=values, axis=dim.val, mode="update", name=node.name))

    register_torch_op(index_copy, override=True)
