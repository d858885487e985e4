"""Gemma 4's RMSNorm in a form XNNPACK delegates whole, swapped into a view of a module tree.

transformers' Gemma4RMSNorm computes `x * pow(mean(x^2, -1) + eps, -0.5)`. XNNPACK takes
neither: its `pow` is square-only and its `mean` only averages the two inner dims of a 4-D
tensor. Each of the ~8 norms per decoder layer then falls back to portable kernels and splits
the graph into another delegate, so lowering time and per-call overhead grow with the number
of norms (shared/EXPORT-NOTES.md: "RMSNorm ... stayed on portable kernels"). Here the mean
is a product with a constant [1, D] row of 1/D and the power is `rsqrt`: every op is one
XNNPACK supports (mul, linear, add, rsqrt). The result equals transformers' to float
rounding (a matmul sums in another order); tests compare against transformers end to end.

This can go when XNNPACK's partitioner accepts mean over the last dim and pow(-0.5).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm


class XnnpackRMSNorm(nn.Module):
    """Same weights and eps as the Gemma4RMSNorm it replaces (the weight is shared)."""

    def __init__(self, src: Gemma4RMSNorm, dim: int) -> None:
        super().__init__()
        self.eps = src.eps
        self.weight = src.weight if src.with_scale else None
        # A buffer, not an nn.Linear: quantizers leave it alone.
        self.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_squared = F.linear(x * x, self.mean_row)  # [..., 1]
        out = x * torch.rsqrt(mean_squared + self.eps)
        return out * self.weight if self.weight is not None else out


def swap_rms_norms(module: nn.Module, example_inputs: tuple) -> nn.Module:
    """A view of `module` whose Gemma4RMSNorm children are XnnpackRMSNorm.

    Shallow-copies the module tree (parameters and buffers are shared, not copied), so the
    loaded reference model keeps its own norms. Norms without a weight do not know their
    width, so one forward on `example_inputs` records it (a module with state, such as a
    decoder's KV cache, should be reset afterwards).
    """
    widths: dict[int, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: widths.__setitem__(id(m), args[0].shape[-1]))
             for m in module.modules() if isinstance(m, Gemma4RMSNorm)]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return _swap(module, widths)


def _swap(module: nn.Module, widths: dict[int, int]) -> nn.Module:
    if isinstance(module, Gemma4RMSNorm):
        if id(module) not in widths:  # never called: leave it as it is
            return module
        return XnnpackRMSNorm(module, widths[id(module)])
    clone = copy.copy(module)
    clone._modules = {name: (_swap(child, widths) if child is not None else None)
                      for name, child in module._modules.items()}
    return clone
