"""RMSNorm written in the form onnxruntime fuses into one SimplifiedLayerNormalization.

transformers' Gemma4RMSNorm computes `x * pow(mean(x^2) + eps, -0.5) * w`, which exports
as Pow, ReduceMean, Add, Pow, Mul, Mul: six nodes per norm that onnxruntime's
SimplifiedLayerNormFusion does not match (it looks for Sqrt then Div), 30 norms at 4
layers, ~170 at full E2B depth, each node a kernel launch per decode step. Written as
`x / sqrt(mean(x^2) + eps) * w` the same norm becomes one fused kernel when the session
is created (checked by tests/test_onnx_export.py on the exported decoder). Equal to
transformers' to float rounding; the parity tests compare every graph against it.

Norms without a weight (Gemma 4's v_norm) are left as they are: the fusion needs a scale.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm


class FusableRMSNorm(nn.Module):
    """Same weight (shared, not copied) and eps as the Gemma4RMSNorm it replaces."""

    def __init__(self, src: Gemma4RMSNorm) -> None:
        super().__init__()
        # transformers 5.25 renamed Gemma4RMSNorm.eps to variance_epsilon.
        self.eps = src.variance_epsilon if hasattr(src, "variance_epsilon") else src.eps
        self.weight = src.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def use_fusable_norms_(module: nn.Module) -> int:
    """Replace, in place, every Gemma4RMSNorm with a weight under `module`. Returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, Gemma4RMSNorm) and child.with_scale:
                parent._modules[name] = FusableRMSNorm(child)
                swapped += 1
    return swapped
