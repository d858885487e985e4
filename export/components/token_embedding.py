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
    def __init__(self, lm) -> None:
        super().__init__()
        text = lm.model.language_model
        cfg = text.config
        self.embed_tokens = text.embed_tokens  # scales by sqrt(hidden) itself
        self.embed_tokens_per_layer = getattr(text, "embed_tokens_per_layer", None)
        self.num_layers = cfg.num_hidden_layers
        self.ple_dim = cfg.hidden_size_per_layer_input

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,S] -> inputs_embeds [B,S,H], per_layer_inputs [B,S,L,P]."""
        embeds = self.embed_tokens(input_ids)
        if self.embed_tokens_per_layer is None:
            return embeds, embeds.new_zeros((*input_ids.shape, self.num_layers, 0))
        ple = self.embed_tokens_per_layer(input_ids)
        return embeds, ple.reshape(*input_ids.shape, self.num_layers, self.ple_dim)
