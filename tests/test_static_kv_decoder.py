"""Per-component numerical tests against transformers: the static-KV text decoder (CPU, eager).

StaticKVDecoder keeps K/V in buffers (global layers: max_context slots; sliding layers: a
ring of window + max_seq_len - 1 slots). Checked against Gemma4ForConditionalGeneration on
the same weights: chunked prefill then decode far past the window and several times around
the ring, soft tokens (image + audio rows, pad-id PLE rows), and a second conversation
restarting at position 0 over a dirty cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgekit.export.components.static_kv_decoder import StaticKVDecoder, ring_size, slot_positions
from edgekit.export.components.token_embedding import MultimodalEmbedding, TokenEmbedding
from edgekit.checkpoint import load

MAX_CONTEXT = 128
ATOL = 2e-4


@pytest.fixture(scope="module", params=["tiny_e2b", "tiny_e4b"])
def model(request):
    return load(request.getfixturevalue(request.param)).reference_model()


def _run(decoder: StaticKVDecoder, embeds: torch.Tensor, ple: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed the sequence in calls of `chunks` tokens, then one token a call; all logits [T,V]."""
    out, t = [], 0
    sizes = chunks + [1] * (embeds.shape[1] - sum(chunks))
    for size in sizes:
        out.append(decoder(embeds[:, t:t + size], ple[:, t:t + size], torch.arange(t, t + size))[0])
        t += size
    return torch.cat(out)


def test_ring_slots_hold_the_latest_positions():
    assert ring_size(sliding_window=512, max_seq_len=512, max_context=8192) == 1023
    assert ring_size(sliding_window=16, max_seq_len=16, max_context=20) == 20  # never more than the context
    held = slot_positions(torch.tensor(9), 4)  # positions 0..9 written at p % 4
    assert held.tolist() == [8, 9, 6, 7]
    assert slot_positions(torch.tensor(1), 4).tolist() == [0, 1, -2, -1]  # never written: negative


@pytest.mark.parametrize("llm_ops", [False, True], ids=["masked", "llm-ops"])
@pytest.mark.parametrize("chunks_per_window", [1, 4], ids=["chunk=window", "chunk=window/4"])
def test_prefill_then_decode_around_the_ring_matches_transformers(model, chunks_per_window, llm_ops):
    """`llm_ops`: global layers through ExecuTorch's update_cache / custom_sdpa (eager kernels)."""
    text = model.config.text_config
    window = text.sliding_window
    seq = window // chunks_per_window  # the exporter's chunk: at most the window (E2B: 128 of 512)
    decoder = StaticKVDecoder(model, max_context=MAX_CONTEXT, max_seq_len=seq, last_logits_only=False,
                              llm_ops=llm_ops).eval()
    ring = decoder.cache_slots["sliding_attention"]
    assert ring == window + seq - 1 < MAX_CONTEXT
    torch.manual_seed(0)
    ids = torch.randint(10, text.vocab_size, (1, 4 * ring))  # around the ring 4 times
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
        embeds, ple = TokenEmbedding(model).eval()(ids)
        got = _run(decoder, embeds, ple, [seq, 3, seq, 1, seq - 2])
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=1e-4)
    assert torch.equal(got.argmax(-1), reference.argmax(-1))
    # Shared-KV tail layers own no buffers; sliding buffers are ring-sized, global ones context-sized.
    layout = decoder.layout
    names = {name for name, _ in decoder.named_buffers() if "_cache_" in name}
    assert names == {f"{kv}_cache_{i}" for i in layout.owners for kv in "kv"}
    assert len(layout.owners) < text.num_hidden_layers
    for i in layout.owners:
        is_global = layout.layer_types[i] == "full_attention"
        slots = getattr(decoder, f"k_cache_{i}").shape[1 if llm_ops and is_global else 2]  # the ops' layout
        assert slots == (MAX_CONTEXT if is_global else ring)


@pytest.mark.parametrize("llm_ops", [False, True], ids=["masked", "llm-ops"])
def test_last_logits_only_and_a_new_conversation_over_a_dirty_cache(model, llm_ops):
    text = model.config.text_config
    decoder = StaticKVDecoder(model, max_context=MAX_CONTEXT, max_seq_len=text.sliding_window, llm_ops=llm_ops).eval()
    torch.manual_seed(1)
    first, second = torch.randint(10, text.vocab_size, (1, 60)), torch.randint(10, text.vocab_size, (1, 9))
    embed = TokenEmbedding(model).eval()
    with torch.no_grad():
        _run(decoder, *embed(first), [text.sliding_window])
        # Restart at position 0 without a reset: slots written by the first conversation are masked.
        logits = decoder(*embed(second), torch.arange(9))
        reference = model(input_ids=second).logits[0, -1:]
    assert logits.shape == (1, text.vocab_size)
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=1e-4)


def test_soft_tokens_match_transformers(model, monkeypatch):
    """Image and audio rows (PLE from the pad id) through chunked prefill give transformers' logits."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    cfg = model.config
    hidden, window = cfg.text_config.hidden_size, cfg.text_config.sliding_window
    n_image, n_audio = 20, 7  # the image spans more than one chunk
    ids = torch.tensor([[2, 11, cfg.boi_token_id, *[cfg.image_token_id] * n_image, cfg.eoi_token_id, 12,
                         cfg.boa_token_id, *[cfg.audio_token_id] * n_audio, cfg.eoa_token_index, 13, 14, 15]])
    torch.manual_seed(2)
    image, audio = torch.randn(n_image, hidden), torch.randn(n_audio, hidden)
    monkeypatch.setattr(model.model, "get_audio_features", lambda *a, **k: SimpleNamespace(
        pooler_output=audio[None], attention_mask=torch.ones(1, n_audio, dtype=torch.bool)))
    decoder = StaticKVDecoder(model, max_context=MAX_CONTEXT, max_seq_len=window, last_logits_only=False).eval()
    with torch.no_grad():
        images = {"image": BaseModelOutputWithPooling(pooler_output=[image])}
        reference = model(input_ids=ids, mm_encoder_outputs=images,
                          input_features=torch.zeros(1, 4 * n_audio, 128),
                          input_features_mask=torch.ones(1, 4 * n_audio, dtype=torch.bool)).logits[0]
        embeds, ple = MultimodalEmbedding(model).eval()(ids, image, audio)
        got = _run(decoder, embeds, ple, [window, window])
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=1e-4)
