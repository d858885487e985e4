"""The Gemma 4 text decoder with its KV cache held inside the module: the ExecuTorch `text_decoder`.

export/components/text_decoder.py passes the cache in and out as tensors (what ONNX
Runtime wants). An ExecuTorch program keeps it instead, as mutable buffers that persist
between calls, so a stock runner passes only embeddings and cache positions. This module
reuses TextDecoder's math (per-layer stream, decoder layer, softcapped tied head) and
replaces where K/V live, how the masks are built, and how attention is written (shapes
XNNPACK delegates: -1 for the sequence dim, bmm, rotate_half as a product):

    inputs_embeds [1,S,H]  per_layer_inputs [1,S,L*P]  cache_position [S] (absolute positions)
        │                         │                         │ slots: global p, sliding p % R
        ▼                         ▼                         ▼
    L x layer: cache-owning layers write K/V at their slots (index_copy_ on a buffer), then
               attend over the whole buffer under a mask built from the slot positions;
               shared-KV tail layers read their producer's buffer and own none
        ▼
    norm -> lm_head (last position only) -> softcap -> logits [1,V]

Caches (one K and one V buffer per cache-owning layer, [1, kv_heads, slots, head_dim]):
- global layers: `max_context` slots, slot = position.
- sliding layers: a ring of R = min(max_context, sliding_window + max_seq_len - 1) slots,
  slot = position % R. Keys are written before attention, so during one call the ring must
  still hold the window of the chunk's first token while it holds the whole chunk:
  window - 1 + S slots. With S <= max_seq_len that is R; decode (S = 1) needs only the window.
  Which position a slot holds follows from the last written position alone (positions are
  written in order), so no position buffer is kept: slot j holds last - ((last - j) mod R),
  negative meaning never written.
Static-cache cost: masked attention reads every slot of the buffer each call. With
`llm_ops` (the XNNPACK export) global layers instead keep their cache as [1, slots, kv_heads,
head_dim] and go through ExecuTorch's LLM custom ops, llama::update_cache and
llama::custom_sdpa (causal from the call's first position), which read only positions
0..last: at E2B's 8192-slot context most of a global layer's 16 MiB K and V. Sliding layers
keep masked attention over their ring (the op's causal mode assumes slot = position).
Every call must pass consecutive positions continuing the previous call (or restarting at 0
for a new conversation, which needs no reset: stale slots are masked by position), with
1 <= S <= max_seq_len and positions < max_context.

Parity against transformers (prefill + decode past the window and around the ring, soft
tokens): tests/test_static_kv_decoder.py.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from edgekit.export.components.text_decoder import GLOBAL, NEG_INF, SLIDING, TextDecoder


def ring_size(*, sliding_window: int, max_seq_len: int, max_context: int) -> int:
    """Slots a sliding layer needs when up to `max_seq_len` tokens are written per call."""
    return min(max_context, sliding_window + max_seq_len - 1)


def slot_positions(last: torch.Tensor, slots: int) -> torch.Tensor:
    """Position each of `slots` ring slots holds once positions 0..last were written in order
    (slot = position % slots); negative for a slot never written."""
    j = torch.arange(slots, dtype=last.dtype)
    return last - torch.remainder(last - j, slots)


def _without_tables(text: nn.Module) -> nn.Module:
    """A shallow view of the text model without its embedding tables (parameters shared):
    they belong to the token_embedding method, and an exported decoder must not carry them."""
    view = copy.copy(text)
    view._modules = {k: m for k, m in text._modules.items() if k not in ("embed_tokens", "embed_tokens_per_layer")}
    return view


def _rotate_half_matrix(dim: int) -> torch.Tensor:
    """W with F.linear(x, W) == rope.rotate_half(x): out[j] = -x[j + D/2] for j < D/2, else x[j - D/2]."""
    half = dim // 2
    w = torch.zeros(dim, dim)
    j = torch.arange(half)
    w[j, j + half] = -1.0
    w[j + half, j] = 1.0
    return w


class StaticKVDecoder(TextDecoder):
    """Decoder with K/V in mutable buffers; one forward serves prefill (S > 1) and decode (S = 1)."""

    def __init__(self, lm, *, max_context: int, max_seq_len: int, last_logits_only: bool = True,
                 llm_ops: bool = False) -> None:
        """`lm` is a loaded Gemma4ForConditionalGeneration (weights are shared, not copied).

        `last_logits_only`: return logits [1,V] of the last position (what a runner samples
        from; full [1,S,V] logits of a 512-token chunk at the real vocab are 512 MB).
        `llm_ops`: global layers write and attend with ExecuTorch's LLM custom ops
        (edgekit.export.executorch.llm_ops), reading only the positions written so far.
        """
        super().__init__(lm)
        self.text = _without_tables(self.text)
        # An nn.Linear over the tied weight (shared, not copied), so the quantizer sees it.
        self.lm_head = nn.Linear(self.lm_head_weight.shape[1], self.lm_head_weight.shape[0], bias=False)
        self.lm_head.weight = self.lm_head_weight
        del self.lm_head_weight
        if max_seq_len < 1 or max_seq_len > max_context:
            raise ValueError(f"max_seq_len must be in 1..max_context ({max_context}), got {max_seq_len}")
        self.max_context = max_context
        self.max_seq_len = max_seq_len
        self.last_logits_only = last_logits_only
        layout = self.layout
        self.cache_slots = {
            GLOBAL: max_context,
            SLIDING: ring_size(sliding_window=layout.sliding_window, max_seq_len=max_seq_len, max_context=max_context),
        }
        self.llm_ops = llm_ops
        if llm_ops:
            from edgekit.export.executorch.llm_ops import load_llm_ops
            load_llm_ops()
        for i in layout.owners:
            shape = (1, layout.kv_heads[i], self.cache_slots[layout.layer_types[i]], layout.head_dims[i])
            if self._on_llm_ops(i):  # the ops' layout: positions before heads
                shape = (1, shape[2], shape[1], shape[3])
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        self.num_heads = self.text.config.num_attention_heads
        for dim in sorted(set(layout.head_dims)):
            self.register_buffer(f"rotate_half_{dim}", _rotate_half_matrix(dim), persistent=False)

    def _on_llm_ops(self, layer: int) -> bool:
        return self.llm_ops and self.layout.layer_types[layer] == GLOBAL

    def reset_cache(self) -> None:
        """Zero every cache (not needed between conversations: stale slots are masked)."""
        for i in self.layout.owners:
            getattr(self, f"k_cache_{i}").zero_()
            getattr(self, f"v_cache_{i}").zero_()

    # --- masks over cache slots ----------------------------------------------------------
    def _slot_masks(self, cache_position: torch.Tensor) -> dict[str, torch.Tensor]:
        """Additive masks [S, slots] per layer type: causal, within the window for sliding layers."""
        last = cache_position[-1]
        query = cache_position.unsqueeze(1)  # [S,1]
        zero = torch.zeros((), dtype=torch.float32)
        neg = torch.full((), NEG_INF, dtype=torch.float32)
        masks = {}
        for kind in set(self.layout.layer_types) - ({GLOBAL} if self.llm_ops else set()):
            slots = self.cache_slots[kind]
            held = slot_positions(last, slots) if kind == SLIDING else torch.arange(slots, dtype=last.dtype)
            dist = query - held.unsqueeze(0)  # [S, slots]
            allowed = (held >= 0).unsqueeze(0) & (dist >= 0)
            if kind == SLIDING:
                allowed = allowed & (dist < self.layout.sliding_window)
            masks[kind] = torch.where(allowed, zero, neg)
        return masks

    # --- attention: TextDecoder._layer calls this with `kv` = write slots per layer type --
    # Shapes are written with -1 for the sequence dimension and attention uses bmm on 3-D
    # views: XNNPACK delegates neither reshapes to symbolic sizes nor slices of dynamic
    # tensors, and every op it leaves out splits the graph into another delegate.
    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """rope.rotate with rotate_half as a product with a signed permutation (exact in fp32)."""
        return x * cos + F.linear(x, getattr(self, f"rotate_half_{x.shape[-1]}")) * sin

    def _attention(self, i: int, x: torch.Tensor, cos_sin, mask: torch.Tensor, kv: dict, past) -> torch.Tensor:
        attn = self.text.layers[i].self_attn
        layout = self.layout
        head_dim, kind = layout.head_dims[i], layout.layer_types[i]
        cos, sin = cos_sin  # [1,S,1,D]
        q = attn.q_norm(attn.q_proj(x).view(1, -1, self.num_heads, head_dim))
        q = self._rotate(q, cos, sin)  # [1, S, Hq, D]
        if self._on_llm_ops(layout.source[i]):
            return attn.o_proj(self._llm_ops_attention(i, x, q, cos, sin, kv["start"]))
        q = q.transpose(1, 2)  # [1, Hq, S, D]
        if i in layout.owners:
            kv_heads = layout.kv_heads[i]
            k = attn.k_norm(attn.k_proj(x).view(1, -1, kv_heads, head_dim))
            k = self._rotate(k, cos, sin).transpose(1, 2)
            v_src = attn.v_proj(x) if attn.v_proj is not None else attn.k_proj(x)
            v = attn.v_norm(v_src.view(1, -1, kv_heads, head_dim)).transpose(1, 2)
            slots = kv[kind]
            # index_copy_ (exported as an in-place index_put_ that ExecuTorch runs as such);
            # `cache[:, :, slots] = k` exports with a values view its kernel rejects.
            getattr(self, f"k_cache_{i}").index_copy_(2, slots, k)
            getattr(self, f"v_cache_{i}").index_copy_(2, slots, v)
        source = layout.source[i]
        kv_heads = layout.kv_heads[source]
        # A view, not `[0]`: ExecuTorch runs a select as a copy of the whole cache (16 MiB per
        # read of an E2B global layer's K or V), a view_copy as an alias of it.
        cache_len = self.cache_slots[layout.layer_types[source]]
        cache_shape = (kv_heads, cache_len, layout.head_dims[source])
        k_cache = getattr(self, f"k_cache_{source}").view(cache_shape)  # [Hkv, slots, D]
        v_cache = getattr(self, f"v_cache_{source}").view(cache_shape)
        # Grouped-query attention without repeating K/V: the query heads sharing a KV head
        # are folded into the row dimension ([Hkv, g*S, D]); the scores are unfolded to
        # [Hq, S, slots] for the mask [S, slots] to broadcast (a repeated mask is g*S*slots
        # floats of planned memory: 32 MiB for a 128-token chunk at E2B's global layers).
        q = q.reshape(kv_heads, -1, head_dim)
        # Gemma 4 scales by 1 (q_norm / k_norm carry the scale).
        scores = torch.bmm(q, k_cache.transpose(1, 2)).view(self.num_heads, -1, cache_len) + mask
        probs = torch.softmax(scores, dim=-1).view(kv_heads, -1, cache_len)
        out = torch.bmm(probs, v_cache).view(1, self.num_heads, -1, head_dim)
        return attn.o_proj(out.transpose(1, 2).reshape(1, -1, self.num_heads * head_dim))

    def _llm_ops_attention(self, i: int, x: torch.Tensor, q: torch.Tensor, cos, sin, start) -> torch.Tensor:
        """A global layer through llama::update_cache / llama::custom_sdpa: K/V written at
        positions start.., attention causal over positions 0..start+S-1 only (the op skips the
        unwritten slots a masked attention reads), query heads grouped onto KV heads inside."""
        attn = self.text.layers[i].self_attn
        layout = self.layout
        head_dim = layout.head_dims[i]
        if i in layout.owners:
            kv_heads = layout.kv_heads[i]
            k = attn.k_norm(attn.k_proj(x).view(1, -1, kv_heads, head_dim))
            k = self._rotate(k, cos, sin)  # [1, S, Hkv, D]
            v_src = attn.v_proj(x) if attn.v_proj is not None else attn.k_proj(x)
            v = attn.v_norm(v_src.view(1, -1, kv_heads, head_dim))
            torch.ops.llama.update_cache(k, getattr(self, f"k_cache_{i}"), start)
            torch.ops.llama.update_cache(v, getattr(self, f"v_cache_{i}"), start)
        source = layout.source[i]
        # Positional (the schema spells its dropout argument `drpout_p`); scale 1: Gemma 4's
        # q_norm / k_norm carry it.
        out = torch.ops.llama.custom_sdpa(q, getattr(self, f"k_cache_{source}"), getattr(self, f"v_cache_{source}"),
                                          start, None, 0.0, True, 1.0)
        return out.reshape(1, -1, self.num_heads * head_dim)

    def _rope(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1,S,D] of a layer kind's rotary embedding at `position_ids` [1,S]."""
        return self.text.rotary_emb(inputs_embeds, position_ids, kind)

    def forward(self, inputs_embeds: torch.Tensor, per_layer_inputs: torch.Tensor,
                cache_position: torch.Tensor, last_index: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds [1,S,H]; per_layer_inputs [1,S,L*P] (token-identity PLE rows, pad id's
        at soft-token positions); cache_position [S] int64, consecutive absolute positions.

        Returns logits [1,V] of the last position ([1,S,V] when last_logits_only is False), or
        of position `last_index` [1] of the chunk (a fixed-size chunk padded after its tokens).
        """
        layout = self.layout
        slots = {GLOBAL: cache_position, SLIDING: torch.remainder(cache_position, self.cache_slots[SLIDING])}
        if self.llm_ops:  # the position the LLM ops write at: an int, a SymInt once exported
            start = cache_position[0].item()
            torch._check(start >= 0)
            torch._check(start < self.max_context)
            slots["start"] = start
        masks = self._slot_masks(cache_position)
        ple = self._per_layer_stream(inputs_embeds, per_layer_inputs) if self.ple_dim else per_layer_inputs
        position_ids = cache_position.unsqueeze(0)
        rope = {}
        for kind in set(layout.layer_types):
            cos, sin = self._rope(inputs_embeds, position_ids, kind)
            rope[kind] = (cos.unsqueeze(2), sin.unsqueeze(2))  # [1,S,1,D]: broadcast over heads
        h = inputs_embeds
        for i, kind in enumerate(layout.layer_types):
            h = self._layer(i, h, ple, rope[kind], masks.get(kind), slots, None)
        if last_index is not None:
            h = h.index_select(1, last_index).reshape(1, -1)
        elif self.last_logits_only:
            h = h[:, -1]
        logits = self.lm_head(self.text.norm(h))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
