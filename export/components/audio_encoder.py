"""Gemma 4 audio conformer + embed_audio for export: the `audio_encoder` method.

transformers' Gemma4AudioModel.forward does not export: it builds its chunked-attention
mask through masking_utils' vmap path (the legacy exporter trips on torch.vmap; dynamo
with a dynamic length fails, docs/export-notes.md). This module runs transformers' own
subsampling convs, conformer layers and projections on the same weights, and builds the
blocked [B,1,blocks,chunk,context] mask directly from the frame mask — the same values
Gemma4AudioModel._convert_4d_mask_to_blocked_5d produces, without vmap. Parity against
Gemma4Model.get_audio_features: tests/test_encoder_components.py.

Shapes: the number of frames is DYNAMIC (one graph for any clip up to 30 s), with two
constraints the module reports as `frame_multiple` and `min_frames` (for the manifest):
- a multiple of 4 (the two stride-2 subsampling convs), so T_tokens is exactly T_frames / 4
  and torch.export needs no ceil-division guards;
- at least 4 * (attention_chunk_size + 1) frames (52 = 0.52 s for the released config):
  torch.export specializes the attention-block count away from 1 (a size-1 dimension
  broadcasts differently), so the graph needs two or more blocks.
The runner pads the log-mel frames with zeros and input_features_mask with False up to
max(min_frames, next multiple of 4). Trailing padded frames do not change the valid tokens
(features are zeroed under the mask before each conv, padded keys are masked in attention,
the depthwise conv is causal), so the same graph serves fixed buckets too.

Runner contract: keep `audio_soft_tokens[0, token_mask[0]]` (a prefix: token i is valid
iff frame 4*i is valid, as transformers' `mask[:, ::2][:, ::2]`); rows past it are
transformers' values for padded positions, not zeros.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edgekit.models.gemma4 import limits
from edgekit.export.components.vision_encoder import bake_clipped_linears

# Two stride-2 convs (Gemma4AudioSubSampleConvProjection): 4 frames per soft token (40 ms).
FRAME_MULTIPLE = limits.MEL_FRAMES_PER_TOKEN
MAX_FRAMES = limits.AUDIO_MAX_TOKENS * limits.MEL_FRAMES_PER_TOKEN  # 30 s


def blocked_attention_mask(token_mask: torch.Tensor, *, chunk: int, past: int, future: int,
                           left_window: int, right_window: int) -> torch.Tensor:
    """Blocked chunked-attention mask [B,1,nb,chunk,context], True = masked out.

    Query q = b*chunk + i sees key k = b*chunk + c - past (c < context) when k is a real,
    valid token and the distance d = q - k = i - c + past is in the local window
    (0 <= d < left_window, or 0 < -d < right_window): Gemma4's sliding_window_mask_function
    on the padding mask, blocked as Gemma4AudioModel._convert_4d_mask_to_blocked_5d does.
    transformers also masks the query rows past the sequence in the last block; attention
    crops those rows right after (`attn_output[:, :seq_length]`), so they are left alone here.
    """
    context = chunk + past + future
    # Key validity per block, laid out exactly like the attention's key context windows
    # (Gemma4AudioAttention._extract_block_context): out-of-range keys are False.
    keys = F.pad(token_mask, (past, future + chunk - 1)).unfold(1, context, chunk)  # [B, nb, context]
    i = torch.arange(chunk, device=token_mask.device)
    c = torch.arange(context, device=token_mask.device)
    dist = i[:, None] - c[None, :] + past  # [chunk, context], the same for every block
    window = ((dist >= 0) & (dist < left_window)) | ((dist < 0) & (-dist < right_window))
    allowed = keys[:, :, None, :] & window  # [B, nb, chunk, context]
    return ~allowed.unsqueeze(1)


class AudioEncoder(nn.Module):
    """Log-mel frames of one clip -> audio soft tokens in text-embedding space."""

    def __init__(self, lm) -> None:
        """`lm` is a loaded Gemma4ForConditionalGeneration (weights are shared, not copied)."""
        super().__init__()
        tower = lm.model.audio_tower
        cfg = tower.config
        self.subsample = tower.subsample_conv_projection
        self.rel_pos_enc = tower.rel_pos_enc
        self.layers = bake_clipped_linears(tower.layers)
        for layer in self.layers:
            # Gemma4AudioCausalConv1d.left_pad is a functools.cached_property, whose RLock
            # dynamo cannot enter: compute it now so export reads a plain attribute.
            layer.lconv1d.depthwise_conv1d.left_pad  # noqa: B018
        self.output_proj = tower.output_proj
        self.embed_audio = lm.model.embed_audio
        self.mel_bins = cfg.subsampling_conv_channels[0]
        self.frame_multiple = FRAME_MULTIPLE
        self.min_frames = FRAME_MULTIPLE * (cfg.attention_chunk_size + 1)
        self.mask_args = dict(chunk=cfg.attention_chunk_size, past=cfg.attention_context_left - 1,
                              future=cfg.attention_context_right, left_window=cfg.attention_context_left - 1,
                              right_window=cfg.attention_context_right)

    def example_inputs(self, frames: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample for tracing: `frames` log-mel frames, the last eighth of them padding."""
        mask = torch.arange(frames)[None] < frames - frames // 8
        return torch.randn(1, frames, self.mel_bins) * mask[..., None], mask

    def dynamic_shapes(self) -> tuple[dict[int, object], dict[int, object]]:
        """torch.export dynamic_shapes for (input_features, input_features_mask): frames = 4 * tokens."""
        tokens = torch.export.Dim("audio_tokens", min=self.min_frames // FRAME_MULTIPLE,
                                  max=MAX_FRAMES // FRAME_MULTIPLE)
        frames = FRAME_MULTIPLE * tokens
        return {1: frames}, {1: frames}

    #   input_features [1,T,128]   input_features_mask [1,T]
    #        │                          │
    #   2 x (mask, conv3x3/2, LayerNorm, ReLU) -> linear    mask[::2][::2] = token_mask [1,T/4]
    #        ▼                                                   │
    #   L x conformer layer (FFN/2, chunked local attention ◄── blocked mask, light conv, FFN/2)
    #        ▼
    #   output_proj -> embed_audio (RMSNorm, projection) -> audio_soft_tokens [1,T/4,H]
    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_features [1, T, 128] float32 log-mel, input_features_mask [1, T] bool/int.

        Eager accepts any T; the exported graph needs T % 4 == 0 and T >= min_frames.

        Returns audio_soft_tokens [1, T/4, text_hidden] float32 and token_mask [1, T/4] bool.
        """
        mask = input_features_mask.bool()
        h, token_mask = self.subsample(input_features, mask)
        pos = self.rel_pos_enc(h)
        blocked = blocked_attention_mask(token_mask, **self.mask_args)
        for layer in self.layers:
            h = layer(h, attention_mask=blocked, position_embeddings=pos)
        return self.embed_audio(self.output_proj(h)), token_mask
