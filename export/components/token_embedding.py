"""Token ids -> (inputs_embeds, per-layer inputs): the `token_embedding` / `embedding` method.

Both lookups read a few rows of big tables (the per-layer table is 2.35 B of E2B's
5.1 B parameters), so this is its own graph that a runtime can keep memory-mapped.
For image/audio positions the runner passes the pad id, as transformers' Gemma4Model
does before scattering the soft tokens in.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    """input_ids [B,S] -> inputs_embeds [B,S,H], per_layer_inputs [B,S,L*P] (flat, as
    onnxruntime-genai passes it between its embedding and decoder graphs)."""

    def __init__(self, lm) -> None:
        super().__init__()
        text = lm.model.language_model
        cfg = text.config
        self.embed_tokens = text.embed_tokens  # scales by sqrt(hidden) itself
        self.embed_tokens_per_layer = getattr(text, "embed_tokens_per_layer", None)
        self.ple_width = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_tokens(input_ids)
        if self.embed_tokens_per_layer is None:
            return embeds, embeds.new_zeros((*input_ids.shape, 0))
        return embeds, self.embed_tokens_per_layer(input_ids)


class MultimodalEmbedding(nn.Module):
    """onnxruntime-genai's `embedding` graph: token lookups plus the encoders' soft tokens.

        input_ids [B,S]   image_features [Ni,H]   audio_features [Na,H]
            │ image/audio ids -> pad id (transformers Gemma4Model does the same)
            ▼
        embed + PLE lookup ──► rows at image / audio token positions replaced, in order,
                               by image_features / audio_features rows
        ─► inputs_embeds [B,S,H], per_layer_inputs [B,S,L*P]

    Features may have 0 rows (decode steps, text-only prompts).
    """

    def __init__(self, lm) -> None:
        super().__init__()
        self.tokens = TokenEmbedding(lm)
        cfg = lm.config
        self.image_token_id = cfg.image_token_id
        self.audio_token_id = cfg.audio_token_id
        self.pad_token_id = cfg.text_config.pad_token_id

    @staticmethod
    def _scatter(embeds: torch.Tensor, is_slot: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # The k-th slot takes the k-th feature row: a gather by running count keeps the
        # graph free of data-dependent shapes. A zero row appended keeps the gather valid
        # when there are no features at all.
        flat_slot = is_slot.reshape(-1)
        order = (torch.cumsum(flat_slot.to(torch.int64), 0) - 1).clamp(min=0)
        padded = torch.cat([features.to(embeds.dtype), features.new_zeros((1, features.shape[-1]))], dim=0)
        order = torch.minimum(order, torch.tensor(padded.shape[0] - 1))
        rows = padded.index_select(0, order).reshape(embeds.shape)
        return torch.where(is_slot.unsqueeze(-1), rows, embeds)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor, audio_features: torch.Tensor):
        is_image = input_ids == self.image_token_id
        is_audio = input_ids == self.audio_token_id
        text_ids = torch.where(is_image | is_audio, torch.full_like(input_ids, self.pad_token_id), input_ids)
        embeds, per_layer = self.tokens(text_ids)
        embeds = self._scatter(embeds, is_image, image_features)
        embeds = self._scatter(embeds, is_audio, audio_features)
        return embeds, per_layer
