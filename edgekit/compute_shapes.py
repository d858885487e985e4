"""How exported graphs compute, shared by the planner, the family memory estimates and the
exporters: prefill chunk, activation dtype, vision attention blocks.

The runtime never imports this: an exported bundle carries its prefill chunk in the
manifest (`prefill_chunk`).
"""

from __future__ import annotations

from typing import Any, Mapping

# Prefill runs in chunks of at most this many tokens; the exporters and the runner keep to
# it for the activation estimate to hold. ExecuTorch plans (and allocates at load) the
# decoder's activations for a whole chunk: at 512 tokens a global layer's scores against an
# 8192-token cache alone are 128 MiB. 128 (ExecuTorch's own LLM export default) cut decode
# RSS by 150 MiB at the same prefill speed (bench/RESULTS.md section 9).
PREFILL_CHUNK = 128
ACTIVATION_BYTES = 4  # CPU kernels compute in fp32 whatever the weight storage


def prefill_chunk(text: Mapping[str, Any], context_length: int, *, ring_buffer: bool = True,
                  whole_input_tokens: int = 0) -> int:
    """Most tokens one decoder call takes: PREFILL_CHUNK, never more than the context, and
    where sliding layers keep a ring buffer (ExecuTorch's max_seq_len) never more than the
    sliding window, which keeps a ring under two windows. `whole_input_tokens`: where a
    runner feeds each input whole (ExecuTorch's stock runner: an image's soft tokens in one
    call, Format.feeds_inputs_whole), at least that many, within the context."""
    window = int(text.get("sliding_window", PREFILL_CHUNK)) if ring_buffer else PREFILL_CHUNK
    return max(1, min(context_length, PREFILL_CHUNK, window), min(context_length, whole_input_tokens))


# Bytes of one block of vision attention scores (fp32) where the format chunks queries.
VISION_SCORE_CHUNK_BYTES = 128 * 2**20


def vision_query_chunk(num_heads: int, num_patches: int) -> int:
    """Queries per block of the vision encoder's attention (ExecuTorch): one block's scores
    [heads, chunk, P] stay near VISION_SCORE_CHUNK_BYTES; a multiple of 64, at least 64,
    never more than P."""
    rows = VISION_SCORE_CHUNK_BYTES // (ACTIVATION_BYTES * num_heads * num_patches)
    return min(num_patches, max(64, rows // 64 * 64))
