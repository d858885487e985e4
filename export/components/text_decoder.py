"""The Gemma 4 text decoder re-authored for export, with the KV cache as explicit tensors.

transformers' Gemma4TextModel keeps its cache in a Python Cache object and builds masks
with vmap-style helpers; neither traces into a static graph. This module runs the same
math with the same weights (it holds transformers' own submodules) but takes the cache
as inputs and returns it as outputs, so one graph serves prefill (S > 1) and decode
(S == 1). Parity against Gemma4ForConditionalGeneration is tested in
tests/test_text_decoder_parity.py.

    inputs_embeds [B,S,H]  per_layer_inputs [B,S,L*P]  position_ids [B,S]  attention_mask [B,T]
        │                          │ (token-identity PLE rows, already scaled)
        ├── per_layer_model_projection ─┴─► per-layer stream [B,S,L,P]
        ▼
    L x layer:  attn (own K/V: cat(past, new) -> present; shared-KV tail: producer's K/V)
                mlp, per-layer gate, layer scalar
        ▼
    norm -> tied lm_head -> softcap(30) -> logits [B,S,V]

Cache semantics: global layers' past holds all T - S earlier positions. A sliding layer's
past may hold all of them too (onnxruntime-genai passes every layer the whole history) or
only the most recent ones (edgekit's runner keeps window - 1: `sliding_cache_layers`); the
graph masks by each kind's own past length, so positions older than the window are masked
either way. Masks use cache slots, as transformers does, so left-padded batches match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgekit.export.components.rope import rotate

NEG_INF = torch.finfo(torch.float32).min
GLOBAL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclass(frozen=True)
class CacheLayout:
    """Which layers own a KV cache and which producer each shared layer reads."""

    layer_types: tuple[str, ...]
    owners: tuple[int, ...]  # layers with their own K/V, in order
    source: tuple[int, ...]  # per layer: the layer whose K/V it attends to
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    sliding_window: int

    @classmethod
    def from_config(cls, text_config) -> "CacheLayout":
        modes = text_config.kv_sharing_modes
        types = tuple(text_config.layer_types)
        owners = tuple(i for i, m in enumerate(modes) if m != "reuse")
        # A shared layer reads the last cache-owning layer of its own type (transformers
        # Gemma4TextConfig.kv_sharing_modes marks that layer "store").
        store = {types[i]: i for i, m in enumerate(modes) if m == "store"}
        source = tuple(i if modes[i] != "reuse" else store[types[i]] for i in range(len(types)))
        per_layer = text_config.per_layer_config
        head_dims = tuple(per_layer[i].head_dim for i in range(len(types)))
        kv_heads = tuple(per_layer[i].num_key_value_heads for i in range(len(types)))
        return cls(types, owners, source, head_dims, kv_heads, text_config.sliding_window)


class TextDecoder(nn.Module):
    """Decoder with explicit past/present KV for the cache-owning layers only."""

    def __init__(self, lm) -> None:
        """`lm` is a loaded Gemma4ForConditionalGeneration (weights are shared, not copied)."""
        super().__init__()
        text = lm.model.language_model
        cfg = text.config
        self.text = text
        self.lm_head_weight = lm.lm_head.weight
        self.softcap = cfg.final_logit_softcapping
        self.layout = CacheLayout.from_config(cfg)
        self.num_layers = cfg.num_hidden_layers
        self.ple_dim = cfg.hidden_size_per_layer_input
        # Runner hints (the manifest): which past inputs may hold only the last window - 1
        # positions, and the window.
        self.sliding_window = self.layout.sliding_window
        self.sliding_cache_layers = tuple(i for i in self.layout.owners if self.layout.layer_types[i] == SLIDING)

    # --- per-layer embeddings: the context part, from inputs_embeds ---------------------
    def _per_layer_stream(self, inputs_embeds: torch.Tensor, per_layer_inputs: torch.Tensor) -> torch.Tensor:
        text = self.text
        proj = text.per_layer_model_projection(inputs_embeds) * text.per_layer_model_projection_scale
        proj = proj.reshape(*inputs_embeds.shape[:-1], self.num_layers, self.ple_dim)
        proj = text.per_layer_projection_norm(proj)
        rows = per_layer_inputs.reshape(*per_layer_inputs.shape[:-1], self.num_layers, self.ple_dim)
        return (proj + rows) * text.per_layer_input_scale

    def _mask(self, attention_mask: torch.Tensor, past_len, seq_len: int, window: int | None) -> torch.Tensor:
        """Additive mask [B,1,S,past_len+S] over a kind's own past (its most recent past_len
        positions) and the new ones; `window`: also mask keys `window` or more positions back."""
        keys = past_len + seq_len
        valid = attention_mask[:, attention_mask.shape[1] - keys:]  # the slots those keys are in
        q_slot = torch.arange(seq_len, device=attention_mask.device).unsqueeze(1) + past_len  # [S,1]
        kv_slot = torch.arange(keys, device=attention_mask.device).unsqueeze(0)  # [1,keys]
        dist = q_slot - kv_slot
        allowed = (dist >= 0) if window is None else (dist >= 0) & (dist < window)
        allowed = allowed.unsqueeze(0).unsqueeze(0) & valid[:, None, None, :].bool()
        zero = torch.zeros((), dtype=torch.float32)
        neg = torch.full((), NEG_INF, dtype=torch.float32)
        return torch.where(allowed, zero, neg)

    def _attention(self, i: int, x: torch.Tensor, cos_sin, mask: torch.Tensor, kv: dict, past: dict) -> torch.Tensor:
        attn = self.text.layers[i].self_attn
        b, s, _ = x.shape
        head_dim = self.layout.head_dims[i]
        cos, sin = cos_sin
        q = attn.q_norm(attn.q_proj(x).view(b, s, -1, head_dim))
        q = rotate(q, cos, sin).transpose(1, 2)
        if i in past:  # a cache-owning layer: new K/V appended to its past
            k = attn.k_norm(attn.k_proj(x).view(b, s, -1, head_dim))
            k = rotate(k, cos, sin).transpose(1, 2)
            v_src = attn.v_proj(x) if attn.v_proj is not None else attn.k_proj(x)
            v = attn.v_norm(v_src.view(b, s, -1, head_dim)).transpose(1, 2)
            past_k, past_v = past[i]
            kv[i] = (torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
        k, v = kv[self.layout.source[i]]
        heads, kv_heads = q.shape[1], k.shape[1]
        # Grouped-query attention without repeating K/V (an Expand that copied the whole cache
        # per layer and step: 8% of a 4-layer int4 decode): the query heads sharing a KV head
        # are folded into the row dimension, [B, Hkv, g*S, D], and the scores unfolded to
        # [B, Hq, S, P] for the mask to broadcast.
        q = q.reshape(b, kv_heads, -1, head_dim)
        # Gemma 4 scales by 1 (q_norm / k_norm carry the scale).
        scores = torch.matmul(q, k.transpose(2, 3)).view(b, heads, s, -1) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, kv_heads, -1, k.shape[2])
        out = torch.matmul(probs, v).view(b, heads, s, head_dim).transpose(1, 2).reshape(b, s, -1)
        return attn.o_proj(out)

    def _layer(self, i: int, h: torch.Tensor, ple: torch.Tensor, cos_sin, mask, kv, past) -> torch.Tensor:
        layer = self.text.layers[i]
        residual = h
        h = layer.post_attention_layernorm(self._attention(i, layer.input_layernorm(h), cos_sin, mask, kv, past))
        h = residual + h
        residual = h
        h = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = residual + h
        if self.ple_dim:
            residual = h
            g = layer.act_fn(layer.per_layer_input_gate(h)) * ple[:, :, i, :]
            h = residual + layer.post_per_layer_input_norm(layer.per_layer_projection(g))
        return h * layer.layer_scalar

    def forward(self, inputs_embeds: torch.Tensor, per_layer_inputs: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_kv: tuple[torch.Tensor, ...]):
        """per_layer_inputs: the token-identity rows, flat [B,S,L*P] as onnxruntime-genai passes them;
        past_kv: (k, v) for each cache-owning layer in order, each [B, kv_heads, P, head_dim].

        Returns (logits [B,S,V], present k/v for each cache-owning layer, [B, kv_heads, P+S, head_dim]).
        """
        owners = self.layout.owners
        past = {layer: (past_kv[2 * n], past_kv[2 * n + 1]) for n, layer in enumerate(owners)}
        seq_len = inputs_embeds.shape[1]
        masks = {GLOBAL: self._mask(attention_mask, attention_mask.shape[1] - seq_len, seq_len, None)}
        if SLIDING in self.layout.layer_types:
            # every sliding owner's past holds the same recent positions (all of them, or fewer)
            sliding_past = past[self.sliding_cache_layers[0]][0].shape[2]
            masks[SLIDING] = self._mask(attention_mask, sliding_past, seq_len, self.layout.sliding_window)
        ple = self._per_layer_stream(inputs_embeds, per_layer_inputs) if self.ple_dim else per_layer_inputs
        rope = {t: self.text.rotary_emb(inputs_embeds, position_ids, t) for t in set(self.layout.layer_types)}
        h = inputs_embeds
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, kind in enumerate(self.layout.layer_types):
            h = self._layer(i, h, ple, rope[kind], masks[kind], kv, past)
        h = self.text.norm(h)
        logits = torch.nn.functional.linear(h, self.lm_head_weight)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        present = [t for layer in owners for t in kv[layer]]
        return (logits, *present)
