"""TorchScript op converters for Gemma 4's modules that coremltools 9.0 lacks or gets wrong.

The decoders write their KV caches with `index_copy_` (register_index_copy).

The conformer's blocked local attention (transformers' Gemma4AudioAttention
`_extract_block_context`, and edgekit's blocked_attention_mask beside it) uses
`Tensor.unfold`, `torch.movedim` and `|` on bool masks; ct.convert stops with
"PyTorch convert function for op '...' not implemented" on each (the vision encoder needs
none of them). They handle what the encoders trace to: constant dims and sizes, bool masks.

Three stock converters are wrapped, for the dtypes coremltools changes and torch keeps
(each wrapper hands every other case to the stock converter):
- `pad` promotes a bool tensor to fp32 (MIL pad takes floats only) and never casts back, so
  the audio's padded key mask reaches `&` as a float and coremltools' own `__and__` refuses it;
- `clamp` (the missing bound becomes a float32 constant) and `div(..., rounding_mode="floor")`
  compute int tensors in float, which a float16 program then does in fp16: the vision
  encoder's patch positions, clamped and divided by the pooling kernel, lose exactness
  past 2048 (a 1120-token image 16 pixels high has x positions up to 3359), so patches
  would read the wrong position embedding and pool into the wrong soft token. Kept int32.

register_torch_ops() fills only the gaps: a name coremltools already converts (a later
release may add these) keeps coremltools' own converter. The registry is global, so the
wrappers act on TorchScript graphs only (what these encoders are traced to) and leave
torch.export graphs, ExecuTorch's Core ML partitioner among them, to the stock converters.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable, Iterator

import numpy as np


def unfold(context, node) -> None:
    """Tensor.unfold(dim, size, step): MIL sliding_windows puts the window axis right after
    `dim`, torch puts it last, so a transpose follows; bool goes through int32 because
    sliding_windows takes only fp16/fp32/int32 (the attention mask is bool)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    x, dim, size, step = _get_inputs(context, node, expected=4)
    rank = x.rank
    axis = int(dim.val) % rank
    is_bool = types.is_bool(x.dtype)
    source = mb.cast(x=x, dtype="int32") if is_bool else x
    windows = mb.sliding_windows(x=source, axis=axis, size=int(size.val), stride=int(step.val))
    perm = [d for d in range(rank + 1) if d != axis + 1] + [axis + 1]
    name = node.name if not is_bool else node.name + "_int32"
    result = mb.transpose(x=windows, perm=perm, name=name)
    if is_bool:
        result = mb.cast(x=result, dtype="bool", name=node.name)
    context.add(result)


def movedim(context, node) -> None:
    """torch.movedim(x, source, destination) with constant dims: a transpose (the dims not
    moved keep their order and fill the free slots, as torch defines it)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    x, source, destination = _get_inputs(context, node, expected=3)
    rank = x.rank
    sources = [int(d) % rank for d in np.atleast_1d(source.val)]
    destinations = [int(d) % rank for d in np.atleast_1d(destination.val)]
    perm: list[int | None] = [None] * rank
    for src, dst in zip(sources, destinations):
        perm[dst] = src
    rest = iter(d for d in range(rank) if d not in sources)
    perm = [next(rest) if p is None else p for p in perm]
    context.add(mb.transpose(x=x, perm=perm, name=node.name))


def bitwise_or(context, node) -> None:
    """`a | b` on bool masks (aten::__or__) is a logical or; Core ML has no integer bit ops,
    as coremltools' own `__and__` converter also requires bool inputs."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    x, y = _get_inputs(context, node, expected=2)
    if not (types.is_bool(x.dtype) and types.is_bool(y.dtype)):
        raise NotImplementedError(f"`|` is converted for bool tensors only, got {x.dtype} and {y.dtype}")
    context.add(mb.logical_or(x=x, y=y, name=node.name))


def pad_keeping_bool(stock: Callable) -> Callable:
    """coremltools' pad (or constant_pad_nd) converter `stock`, with a bool input's padded
    result cast back to bool (torch keeps the dtype; the pad value of a mask is False = 0)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    def pad(context, node) -> None:
        if not _traced(context) or not types.is_bool(context[node.inputs[0]].dtype):
            return stock(context, node)
        stock(context, node)
        padded = mb.cast(x=context[node.name], dtype="bool", name=node.name + "_bool")
        context.add(padded, torch_name=node.name, override=True)

    return pad


def clamp_keeping_int(stock: Callable) -> Callable:
    """coremltools' clamp converter `stock`, except an int tensor with constant int bounds
    (or none), which becomes int32 maximum / minimum."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    def clamp(context, node) -> None:
        if not _traced(context):
            return stock(context, node)
        x, *bounds = _get_inputs(context, node, expected=[1, 2, 3])
        low, high = (bounds + [None, None])[:2]
        given = [b for b in (low, high) if b is not None]
        if not types.is_int(x.dtype) or not all(types.is_int(b.dtype) and b.val is not None for b in given):
            return stock(context, node)
        result = _int32(x)
        if low is not None:
            result = mb.maximum(x=result, y=np.int32(low.val))
        if high is not None:
            result = mb.minimum(x=result, y=np.int32(high.val))
        context.add(mb.identity(x=result, name=node.name))

    return clamp


def div_keeping_int(stock: Callable) -> Callable:
    """coremltools' div converter `stock`, except floor division of int tensors, which
    becomes int32 floor_div (MIL floor_div takes int32)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    def div(context, node) -> None:
        if not _traced(context):
            return stock(context, node)
        inputs = _get_inputs(context, node, expected=[2, 3])
        x, y = inputs[:2]
        rounding = inputs[2].val if len(inputs) > 2 and inputs[2] is not None else None
        if rounding != "floor" or not (types.is_int(x.dtype) and types.is_int(y.dtype)):
            return stock(context, node)
        context.add(mb.floor_div(x=_int32(x), y=_int32(y), name=node.name))

    return div


def _traced(context) -> bool:
    from coremltools.converters.mil.frontend.torch.utils import TorchFrontend

    return context.frontend == TorchFrontend.TORCHSCRIPT


def _int32(var):
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    return var if var.dtype == types.int32 else mb.cast(x=var, dtype="int32")


# coremltools' canonical op names (aten::__or__ is looked up as "or").
CONVERTERS: dict[str, Callable] = {"unfold": unfold, "movedim": movedim, "or": bitwise_or}
# Stock converters and their wrappers.
WRAPPED: dict[str, Callable[[Callable], Callable]] = {
    "pad": pad_keeping_bool, "constant_pad_nd": pad_keeping_bool,
    "clamp": clamp_keeping_int, "clip": clamp_keeping_int,
    "div": div_keeping_int,
}


def register_torch_ops() -> None:
    """Register CONVERTERS for the op names coremltools does not convert and wrap the
    WRAPPED ones; idempotent (a name already converted, or already wrapped, is left alone)."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    for name, convert in CONVERTERS.items():
        if _TORCH_OPS_REGISTRY.get_func(name) is None:
            _TORCH_OPS_REGISTRY.set_func_by_name(convert, name)
    for name, wrap in WRAPPED.items():
        stock = _TORCH_OPS_REGISTRY.get_func(name)
        if not getattr(stock, "edgekit_wraps", None):
            wrapper = wrap(stock)
            wrapper.edgekit_wraps = stock
            _TORCH_OPS_REGISTRY.set_func_by_name(wrapper, name)


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
