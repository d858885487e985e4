"""Metadata methods an edgekit .pte carries for ExecuTorch's stock LLM runner.

The names are the runner's (extension/llm/runner/constants.h: kMaxSeqLen, kMaxContextLen,
kBosId, kEosIds, kVocabSize, kUseKVCache, kEnableDynamicShape, kUseSDPAWithKVCache); each
is a method with no inputs returning int64 scalars (get_eos_ids: one per stop token).
Values come from the checkpoint (bundle_metadata.special_tokens) and the plan, never
re-typed. Readers (edgekit's runtime, tests) use these constants too.
"""

from __future__ import annotations

from edgekit.manifest import SpecialTokens

GET_MAX_SEQ_LEN = "get_max_seq_len"  # most tokens one text_decoder call takes
GET_MAX_CONTEXT_LEN = "get_max_context_len"  # KV cache capacity in positions
GET_BOS_ID = "get_bos_id"
GET_EOS_IDS = "get_eos_ids"
GET_VOCAB_SIZE = "get_vocab_size"
USE_KV_CACHE = "use_kv_cache"
USE_SDPA_WITH_KV_CACHE = "use_sdpa_with_kv_cache"
ENABLE_DYNAMIC_SHAPE = "enable_dynamic_shape"

METADATA_METHODS: tuple[str, ...] = (GET_MAX_SEQ_LEN, GET_MAX_CONTEXT_LEN, GET_BOS_ID, GET_EOS_IDS, GET_VOCAB_SIZE,
                                     USE_KV_CACHE, USE_SDPA_WITH_KV_CACHE, ENABLE_DYNAMIC_SHAPE)


def constant_methods(*, tokens: SpecialTokens, vocab_size: int, max_seq_len: int,
                     max_context: int) -> dict[str, int | list[int]]:
    """The `constant_methods` for ExecuTorch's to_edge_transform_and_lower."""
    return {
        GET_MAX_SEQ_LEN: int(max_seq_len),
        GET_MAX_CONTEXT_LEN: int(max_context),
        GET_BOS_ID: int(tokens.bos_id),
        GET_EOS_IDS: [int(t) for t in tokens.eos_ids],
        GET_VOCAB_SIZE: int(vocab_size),
        USE_KV_CACHE: 1,  # the cache lives in text_decoder's mutable buffers
        USE_SDPA_WITH_KV_CACHE: 0,  # attention is plain ops, no llama::sdpa_with_kv_cache
        ENABLE_DYNAMIC_SHAPE: 1,  # one text_decoder for prefill (S > 1) and decode (S = 1)
    }
