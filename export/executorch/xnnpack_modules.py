"""XNNPACK-friendly stand-ins for two transformers modules, swapped into a view of a module tree.

1. Gemma4RMSNorm computes `x * pow(mean(x^2, -1) + eps, -0.5)`. XNNPACK takes neither op:
   its `pow` is square-only and its `mean` only averages the two inner dims of a 4-D tensor.
   Each of the ~8 norms per decoder layer then falls back to portable kernels and splits the
   graph into another delegate (tiny E2B decoder: 200 delegates; lowering time and per-call
   overhead grow with them; docs/export-notes.md saw the same). XnnpackRMSNorm takes the
   mean as a product with a constant [1, D] row of 1/D and the power as `rsqrt`: mul, linear,
   add and rsqrt all delegate (24 delegates). Equal to transformers' to float rounding.

2. GELUTanh (`gelu_pytorch_tanh`, Gemma 4's MLP and per-layer-gate activation) lowers to
   XNNPACK's GELU, which ignores approximate="tanh" and computes the erf form: up to 5e-4 off
   per activation, ~2e-3 relative on tiny-E2B logits (measured with executorch 1.5.1).
   TanhGELU writes the tanh formula out of mul/add/tanh, which XNNPACK computes as written.

Both can go when XNNPACK's partitioner accepts mean over the last dim and pow(-0.5), and
its GELU honours approximate="tanh".
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import GELUTanh
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm


class XnnpackRMSNorm(nn.Module):
    """Same weight and eps as the Gemma4RMSNorm it replaces (the weight is shared)."""

    def __init__(self, src: Gemma4RMSNorm, dim: int) -> None:
        super().__init__()
        # transformers 5.25 renamed Gemma4RMSNorm.eps to variance_epsilon.
        self.eps = src.variance_epsilon if hasattr(src, "variance_epsilon") else src.eps
        self.weight = src.weight if src.with_scale else None
        # A buffer, not an nn.Linear: quantizers leave it alone.
        self.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_squared = F.linear(x * x, self.mean_row)  # [..., 1]
        out = x * torch.rsqrt(mean_squared + self.eps)
        return out * self.weight if self.weight is not None else out


class TanhGELU(nn.Module):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's gelu(approximate="tanh")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1.0 + torch.tanh(inner))


def swap_for_xnnpack(module: nn.Module, example_inputs: tuple) -> nn.Module:
    """A view of `module` with XnnpackRMSNorm and TanhGELU in place of transformers' modules.

    Shallow-copies the module tree (parameters and buffers are shared, not copied), so the
    loaded reference model keeps its own modules. A norm without a weight does not know its
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
        return XnnpackRMSNorm(module, widths[id(module)]) if id(module) in widths else module
    if isinstance(module, GELUTanh):
        return TanhGELU()
    clone = copy.copy(module)
    clone._modules = {name: (_swap(child, widths) if child is not None else None)
                      for name, child in module._modules.items()}
    return clone
