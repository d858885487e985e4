"""coremltools converters for the torch ops edgekit's modules use and coremltools 9.0 lacks."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Iterator


def register_index_copy() -> None:
    """torch `index_copy(x, dim, index, values)` -> MIL scatter (mode "update") along `dim`.

    The decoders write their KV caches with `index_copy_`; coremltools converts the in-place
    form itself once the plain op has a converter (a scatter followed by coreml_update_state
    on the cache's state)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types

    def index_copy(context, node):
        x, dim, index, values = ops._get_inputs(context, node, expected=4)
        if index.dtype != types.int32:
            index = mb.cast(x=index, dtype="int32")
        context.add(mb.scatter(data=x, indices=index, updates=values, axis=dim.val, mode="update", name=node.name))

    register_torch_op(index_copy, override=True)


@contextlib.contextmanager
def coremltools_quiet() -> Iterator[None]:
    """Hold back what coremltools prints while it converts (a progress bar per pass, a warning
    per skipped weight): edgekit's own progress lines say what stage an export is in."""
    import logging

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
