"""Load a checkpoint for export without ever holding all of it in fp32.

transformers' fp32 load converts every bf16 tensor as it arrives: E2B's 5.1 B parameters
take 20.4 GB, past what a 24 GiB machine can export from. For the quantized recipes most
weights leave fp32 moments after they are made, so:

    load_in_checkpoint_dtype(ckpt) ─► parameters as stored (bf16), buffers in fp32
        ─► quantizer: upcast_(one module) ─► quantize it ─► next   (peak: one module in fp32)
        ─► upcast_(whatever stayed float) at the end

Upcasting bf16 is exact, so each weight ends equal to an fp32 load's. Buffers are the
trap: the ones transformers computes at construction (RoPE frequencies, embedding scales,
the audio tower's timescales) come out rounded when the model is built in bf16. They are
taken from a second construction in fp32 whose parameters live on the meta device (no
memory), where `_init_weights` computes them exactly as an fp32 load does; buffers the
checkpoint stores are upcast from the file's values, as an fp32 load reads them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from edgekit.checkpoint import Checkpoint
from edgekit.runtimes.mapped_pages import linux_libc


def load_in_checkpoint_dtype(checkpoint: Checkpoint) -> nn.Module:
    """The transformers model with parameters in the checkpoint's dtype and fp32 buffers
    equal to an fp32 load's (see the module docstring)."""
    dtypes = {dtype for header in checkpoint.headers for dtype, _ in header.tensors.values()}
    dtype = "bfloat16" if dtypes == {"BF16"} else "float32"
    model = checkpoint.reference_model(dtype=dtype)
    if dtype == "float32":
        return model
    stored = {name for header in checkpoint.headers for name in header.tensors}
    skeleton = _fp32_skeleton(model.config)
    reference = dict(skeleton.named_buffers())
    for name, buffer in list(model.named_buffers()):
        owner, attr = _owner(model, name)
        source = buffer if name in stored or name not in reference else reference[name]
        owner._buffers[attr] = source.to(torch.float32, copy=source is buffer)
    return model


def upcast_(module: nn.Module) -> nn.Module:
    """Plain float parameters and buffers of `module` (recursively) to fp32, in place.
    Quantized weights (tensor subclasses) are left alone."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is None or type(tensor.data) is not torch.Tensor:
                    continue
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    source = tensor.data
                    tensor.data = source.to(torch.float32)
                    release_pages(source)
    return module


_MADV_PAGEOUT = 21  # Linux 5.4+


def release_pages(tensor: torch.Tensor) -> None:
    """Ask the kernel to reclaim the pages behind `tensor` now (madvise MADV_PAGEOUT).

    transformers maps the checkpoint's safetensors file: every bf16 weight read for an upcast
    stays resident in this process until the whole mapping goes, beside its fp32 and
    quantized copies (full-depth E2B: ~9 GB of file pages at the export's peak). Paging out
    is not destructive: clean file pages are read again if touched, anonymous ones without
    swap stay. A no-op off Linux or where the call fails.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0 or linux_libc() is None:
        return
    page = 4096
    start = tensor.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))  # a view's span
    end = start + extent * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        linux_libc().madvise(first, last - first, _MADV_PAGEOUT)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _fp32_skeleton(config) -> nn.Module:
    import transformers

    with _parameters_on_meta():
        return transformers.Gemma4ForConditionalGeneration._from_config(config, dtype=torch.float32).eval()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device as it is registered, so
    construction and `_init_weights` allocate nothing for weights; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
