"""Gemma 4 vision tower + embed_vision for export: the `vision_encoder` method, one graph per token budget.

transformers' Gemma4VisionModel strips padded soft tokens with `hidden_states[pooler_mask]`
(a data-dependent shape) and pools with `F.one_hot`; neither gives a static graph. This
module runs the same math on the same weights (transformers' own patch embedder, rotary
embedding and encoder layers) but returns every row of the budget plus a validity mask.
Patches are dynamic up to the budget, `max_patches = max_soft_tokens * pooling_kernel_size**2`,
in whole soft tokens (k^2 patches each; see dynamic_shapes): the pooler's slot count is
derived from the input, not fixed, so dynamo keeps it symbolic.
Parity against Gemma4Model.get_image_features: tests/test_encoder_components.py.

`query_chunk` (ExecuTorch): attention one block of queries at a time, in 3-D bmm + plain
softmax. transformers' sdpa path decomposes to a "safe" softmax whose any/where/logical_not
run outside XNNPACK on whole [1, heads, P, P] tensors, and memory planning reserves them all:
3.6 GB of activation memory at a 560-token budget (E2B's tower); chunked, the biggest
intermediate is [1, heads, chunk, P].

Runner contract: feed the output of transformers' Gemma4ImageProcessor(Pil) for the same
`max_soft_tokens`, either padded (zeros, positions (-1, -1)) or trimmed to the image's
own num_soft_tokens * k^2 patches (what onnxruntime-genai and edgekit's runner do); keep
`soft_tokens[0, valid_mask[0]]`. The valid rows are always a prefix of length
`num_soft_tokens_per_image` (the processor's count); padded rows are zeros.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear, repeat_kv

from edgekit.models.gemma4 import limits

NEG_INF = torch.finfo(torch.float32).min


# --- clipped linears with bounds baked in as Python floats ---------------------------
class BakedClipLinear(nn.Module):
    """Gemma4ClippableLinear with its clip bounds as Python floats (shares the weight).

    onnxscript's optimizer turns `clamp(x, min_buffer, max_buffer)` into a `Clip` with
    undefined bounds that onnxruntime refuses to load (docs/export-notes.md, Traps);
    float bounds become constants. Infinite bounds (transformers' init) drop the clamp.
    """

    def __init__(self, src: Gemma4ClippableLinear) -> None:
        super().__init__()
        self.linear = src.linear
        clipped = src.use_clipped_linears

        def bounds(lo: str, hi: str) -> tuple[float, float] | None:
            if not clipped:
                return None
            low, high = float(getattr(src, lo)), float(getattr(src, hi))
            return None if math.isinf(low) and math.isinf(high) else (low, high)

        self.in_bounds = bounds("input_min", "input_max")
        self.out_bounds = bounds("output_min", "output_max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_bounds is not None:
            x = torch.clamp(x, *self.in_bounds)
        x = self.linear(x)
        if self.out_bounds is not None:
            x = torch.clamp(x, *self.out_bounds)
        return x


def bake_clipped_linears(module: nn.Module) -> nn.Module:
    """A view of `module` whose Gemma4ClippableLinear children are BakedClipLinear.

    Shallow-copies the module tree (parameters and buffers are shared, not copied) so the
    loaded reference model is left untouched and keeps serving as the numerical reference.
    """
    if isinstance(module, Gemma4ClippableLinear):
        return BakedClipLinear(module)
    clone = copy.copy(module)
    clone._modules = {name: bake_clipped_linears(child) for name, child in module._modules.items()}
    return clone


# --- attention a block of queries at a time --------------------------------------------
QUERY_CHUNKED = "edgekit_query_chunked"  # the name transformers' AttentionInterface knows it by


def query_chunked_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' eager attention (the same matmul, additive mask, fp32 softmax) over
    blocks of `module.query_chunk` queries; query [B,H,Q,D], mask [B,1,1 or Q,K].
    Returns [B,Q,H,D] as every transformers attention function does.

    3-D bmm on [B*H, ...] views, not a 4-D matmul: matmul's decomposition broadcasts through
    expand_copy, which XNNPACK does not take, so every block's probabilities were copied
    outside the delegate (1.7 GB planned at E2B's width).
    """
    batch, heads, length, dim = query.shape
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    queries = query.reshape(batch * heads, length, dim)
    keys_t = repeat_kv(key, module.num_key_value_groups).reshape(batch * heads, -1, dim).transpose(1, 2)
    values = repeat_kv(value, module.num_key_value_groups).reshape(batch * heads, -1, dim)
    mask = None if attention_mask is None else attention_mask.expand(batch, heads, -1, -1).reshape(
        batch * heads, attention_mask.shape[-2], -1)
    chunk = module.query_chunk
    outputs = []
    for start in range(0, length, chunk):
        scores = torch.bmm(queries[:, start:start + chunk], keys_t) * scaling
        if mask is not None:
            scores = scores + (mask if mask.shape[1] == 1 else mask[:, start:start + chunk])
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.bmm(probs, values))
    out = torch.cat(outputs, dim=1).reshape(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(QUERY_CHUNKED, query_chunked_attention)


def chunk_queries(layers: nn.Module, chunk: int) -> None:
    """Point the (cloned, see bake_clipped_linears) attention modules of `layers` at
    query_chunked_attention through a config copy of their own: the loaded model's
    config, and so the reference model, keeps its attention implementation."""
    for module in layers.modules():
        if hasattr(module, "q_proj") and hasattr(module, "config"):
            config = copy.copy(module.config)
            config._attn_implementation_internal = QUERY_CHUNKED
            module.config = config
            module.query_chunk = chunk


# --- the encoder ---------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """Patches of one image -> soft tokens in text-embedding space, padded to the budget."""

    def __init__(self, lm, max_soft_tokens: int = limits.IMAGE_SOFT_TOKENS, *, query_chunk: int | None = None) -> None:
        """`lm` is a loaded Gemma4ForConditionalGeneration (weights are shared, not copied).
        `query_chunk`: queries per attention block (None: transformers' attention as loaded)."""
        super().__init__()
        tower = lm.model.vision_tower
        cfg = tower.config
        self.patch_embedder = tower.patch_embedder
        self.rotary_emb = tower.encoder.rotary_emb
        self.layers = bake_clipped_linears(tower.encoder.layers)
        self.embed_vision = lm.model.embed_vision
        self.standardize = bool(cfg.standardize)
        if self.standardize:  # the tower's own buffers, shared
            self.register_buffer("std_bias", tower.std_bias, persistent=False)
            self.register_buffer("std_scale", tower.std_scale, persistent=False)
        self.kernel = cfg.pooling_kernel_size
        self.patch_dim = 3 * cfg.patch_size**2
        self.root_hidden = cfg.hidden_size**0.5
        self.max_soft_tokens = max_soft_tokens
        self.max_patches = max_soft_tokens * self.kernel**2
        if query_chunk is not None:
            chunk_queries(self.layers, query_chunk)

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A full-budget sample (a square-ish grid of patches) for tracing."""
        k = self.kernel
        cols = k * max(1, int(self.max_soft_tokens**0.5))
        xs = torch.arange(self.max_patches) % cols
        ys = torch.arange(self.max_patches) // cols
        return torch.rand(1, self.max_patches, self.patch_dim), torch.stack([xs, ys], -1)[None]

    def dynamic_shapes(self) -> tuple[dict[int, object], dict[int, object]]:
        """Patches = k^2 x soft tokens, up to the budget: onnxruntime-genai feeds only an
        image's own patches (no padding), so the graph takes any whole number of tokens."""
        tokens = torch.export.Dim("image_tokens", min=2, max=self.max_soft_tokens)
        patches = self.kernel**2 * tokens
        return {1: patches}, {1: patches}

    def _pool(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average k x k patch cells into soft tokens, as Gemma4VisionPooler does.

        Cell id = x//k + (width//k) * (y//k); the one-hot becomes a comparison with an
        arange (F.one_hot checks its input's range, which does not export).
        """
        k = self.kernel
        pos = positions.clamp(min=0)  # padding (-1) lands in cell 0 with a zero row
        width = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
        cell = torch.div(pos, k, rounding_mode="floor")
        cell = cell[..., 0] + torch.div(width, k, rounding_mode="floor") * cell[..., 1]  # [1, P]
        slots = torch.arange(h.shape[1] // (k * k), device=h.device)
        weights = (cell.unsqueeze(-1) == slots).float() / (k * k)  # [1, P, S]
        pooled = weights.transpose(1, 2) @ h.float()  # [1, S, D]
        valid = (weights != 0).any(dim=1)  # [1, S]
        return pooled, valid

    #   pixel_values [1,P,3*p*p]   pixel_position_ids [1,P,2]  ((-1,-1) = padding)
    #        │                          │
    #   patch_embedder (linear + x/y position tables, padding rows' positions zeroed)
    #        ▼                          │
    #   L x encoder layer  ◄── axial rope, additive key-padding mask [1,1,1,P]
    #        ▼
    #   zero padding rows -> k x k average pool by position -> * sqrt(D) [-> standardize]
    #        ▼
    #   embed_vision (RMSNorm, projection) -> soft_tokens [1,S,H], valid_mask [1,S]
    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [1, max_patches, 3*patch^2] in [0, 1]; pixel_position_ids [1, max_patches, 2] int64.

        Returns soft_tokens [1, max_soft_tokens, text_hidden] float32 and valid_mask
        [1, max_soft_tokens] bool (True = a real soft token; rows past the image are zero).
        """
        padding = (pixel_position_ids == -1).all(dim=-1)  # [1, P]
        h = self.patch_embedder(pixel_values, pixel_position_ids, padding)
        # Additive mask works for both eager and sdpa attention (transformers builds the
        # same key-padding mask with create_bidirectional_mask).
        mask = torch.where(padding, NEG_INF, 0.0)[:, None, None, :].to(h.dtype)
        rope = self.rotary_emb(h, pixel_position_ids)
        for layer in self.layers:
            h = layer(h, position_embeddings=rope, attention_mask=mask, position_ids=pixel_position_ids)
        h = h.masked_fill(padding.unsqueeze(-1), 0.0)
        pooled, valid = self._pool(h, pixel_position_ids)
        pooled = pooled * self.root_hidden  # float32, as the pooler scales (can pass fp16 range)
        if self.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        tokens = self.embed_vision(pooled.to(h.dtype))
        tokens = torch.where(valid.unsqueeze(-1), tokens, 0.0)
        return tokens, valid
