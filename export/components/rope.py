"""Rotary position embedding applied to [B, S, heads, head_dim] tensors.

Gemma 4's global layers use "proportional" rope (only a quarter of the dims rotate);
transformers encodes that in the inverse frequencies (zeros for the rest), so the
rotation itself is the standard rotate-half form.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,S,H,D]; cos/sin [B,S,D] from transformers' Gemma4TextRotaryEmbedding."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
