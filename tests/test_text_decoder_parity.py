"""Per-component numerical tests against transformers: the re-authored text decoder.

Eager TextDecoder (explicit KV) vs Gemma4ForConditionalGeneration on the same weights:
prefill + token-by-token decode past the sliding window, and a left-padded batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgekit.export.components.text_decoder import TextDecoder
from edgekit.export.components.token_embedding import TokenEmbedding
from edgekit.checkpoint import load


def _empty_past(decoder: TextDecoder, batch: int) -> list[torch.Tensor]:
    layout = decoder.layout
    return [torch.zeros(batch, layout.kv_heads[i], 0, layout.head_dims[i]) for i in layout.owners for _ in (0, 1)]


@pytest.fixture(scope="module", params=["tiny_e2b", "tiny_e4b"])
def model(request):
    return load(request.getfixturevalue(request.param)).reference_model()


def test_prefill_then_decode_past_the_window_matches_transformers(model):
    decoder, embed = TextDecoder(model).eval(), TokenEmbedding(model).eval()
    window = model.config.text_config.sliding_window
    torch.manual_seed(0)
    ids = torch.randint(10, model.config.text_config.vocab_size, (1, window * 2 + 8))
    prefill = window + 3
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        embeds, ple = embed(ids)
        out = decoder(embeds[:, :prefill], ple[:, :prefill], torch.arange(prefill)[None],
                      torch.ones(1, prefill, dtype=torch.long), tuple(_empty_past(decoder, 1)))
        logits, present = [out[0]], list(out[1:])
        for t in range(prefill, ids.shape[1]):
            out = decoder(embeds[:, t:t + 1], ple[:, t:t + 1], torch.tensor([[t]]),
                          torch.ones(1, t + 1, dtype=torch.long), tuple(present))
            logits.append(out[0])
            present = list(out[1:])
    got = torch.cat(logits, dim=1)
    assert torch.allclose(got, reference, atol=2e-4, rtol=1e-4), (got - reference).abs().max()
    assert torch.equal(got.argmax(-1), reference.argmax(-1))
    # Cache-owning layers only: the shared-KV tail adds no present tensors.
    layout = decoder.layout
    assert len(present) == 2 * len(layout.owners) < 2 * model.config.text_config.num_hidden_layers


def test_sliding_layers_decode_from_their_last_window_of_past(model):
    """edgekit's runner keeps only window - 1 positions of a sliding layer's past (the graph
    masks by each kind's own past length); onnxruntime-genai passes the whole history.
    Both give transformers' logits, prefill chunks included."""
    decoder, embed = TextDecoder(model).eval(), TokenEmbedding(model).eval()
    window = model.config.text_config.sliding_window
    sliding = {2 * n + kv for n, layer in enumerate(decoder.layout.owners) if layer in decoder.sliding_cache_layers
               for kv in (0, 1)}
    assert sliding and len(sliding) < 2 * len(decoder.layout.owners)  # both kinds are exercised
    torch.manual_seed(3)
    ids = torch.randint(10, model.config.text_config.vocab_size, (1, window * 3 + 5))
    chunks = [window + 2, 3, *[1] * window, window - 1, *[1] * (ids.shape[1] - 3 * window - 4)]
    assert sum(chunks) == ids.shape[1]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        embeds, ple = embed(ids)
        present, logits, start = list(_empty_past(decoder, 1)), [], 0
        for n in chunks:
            end = start + n
            out = decoder(embeds[:, start:end], ple[:, start:end], torch.arange(start, end)[None],
                          torch.ones(1, end, dtype=torch.long), tuple(present))
            logits.append(out[0])
            present = [t[:, :, -(window - 1):] if i in sliding else t for i, t in enumerate(out[1:])]
            start = end
    assert all(present[i].shape[2] == window - 1 for i in sliding)
    got = torch.cat(logits, dim=1)
    assert torch.allclose(got, reference, atol=2e-4, rtol=1e-4), (got - reference).abs().max()
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


def test_left_padded_batch_matches_unpadded_rows(model):
    decoder, embed = TextDecoder(model).eval(), TokenEmbedding(model).eval()
    torch.manual_seed(1)
    short, long = torch.randint(10, 3000, (1, 5)), torch.randint(10, 3000, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        embeds, ple = embed(ids)
        out = decoder(embeds, ple, positions, mask, tuple(_empty_past(decoder, 2)))
        ref_short = model(input_ids=short).logits
        ref_long = model(input_ids=long).logits
    assert torch.allclose(out[0][0, -1], ref_short[0, -1], atol=2e-4)
    assert torch.allclose(out[0][1, -1], ref_long[0, -1], atol=2e-4)


def test_soft_tokens_scattered_like_transformers(model, monkeypatch):
    """Image and audio soft tokens placed by the embedding graph give transformers' logits."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from edgekit.export.components.token_embedding import MultimodalEmbedding

    cfg = model.config
    hidden = cfg.text_config.hidden_size
    ids = torch.tensor([[2, 11, cfg.boi_token_id, *[cfg.image_token_id] * 4, cfg.eoi_token_id, 12,
                         cfg.boa_token_id, *[cfg.audio_token_id] * 3, cfg.eoa_token_index, 13]])
    torch.manual_seed(2)
    image, audio = torch.randn(4, hidden), torch.randn(3, hidden)
    decoder, embed = TextDecoder(model).eval(), MultimodalEmbedding(model).eval()
    # The audio tower is tested on its own; here only the placement of its output matters.
    monkeypatch.setattr(model.model, "get_audio_features", lambda *a, **k: SimpleNamespace(
        pooler_output=audio[None], attention_mask=torch.ones(1, 3, dtype=torch.bool)))
    with torch.no_grad():
        reference = model(input_ids=ids, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[image])},
                          input_features=torch.zeros(1, 12, 128), input_features_mask=torch.ones(1, 12, dtype=torch.bool)).logits
        embeds, ple = embed(ids, image, audio)
        n = ids.shape[1]
        got = decoder(embeds, ple, torch.arange(n)[None], torch.ones(1, n, dtype=torch.long),
                      tuple(_empty_past(decoder, 1)))[0]
        no_features = embed(ids[:, :2], torch.zeros(0, hidden), torch.zeros(0, hidden))[0]
    assert torch.allclose(got, reference, atol=2e-4), (got - reference).abs().max()
    assert no_features.shape == (1, 2, hidden)
