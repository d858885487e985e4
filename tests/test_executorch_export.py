"""ExecuTorch exporter: bundles run through executorch.runtime against transformers and eager modules.

Tiers: CPU unit tests of the export-only module swaps and table splitting (eager); then
per-component numerical tests of two real bundles, exported once per test session
(tests/conftest.py executorch_bundles, shared with the runner tests; ~2.5 min):

- fp32, tiny-e2b, text + vision (budget 70) + audio, context 256: greedy tokens and logits
  vs transformers over 64 decode steps, encoders vs the eager components, an image prompt
  through the packed embeddings vs transformers, metadata methods, manifest.
- 8da4w-emb4, tiny-e2b cut to 4 layers (sliding, global and a shared-KV layer), text, written
  by `edgekit export --device android-flagship`: the program vs the same recipe applied
  eagerly by torchao, and the measured distance to fp32.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgekit.export.executorch import metadata as meta
from edgekit.manifest import (METHOD_AUDIO_ENCODER, METHOD_AUDIO_PREPROCESSOR, METHOD_TEXT_DECODER,
                              METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER)
from edgekit.checkpoint import load
from tests.conftest import EXECUTORCH_CONTEXT as CONTEXT
from tests.conftest import EXECUTORCH_VISION_BUDGET as VISION_BUDGET

runtime = pytest.importorskip("executorch.runtime")
slow = pytest.mark.slow  # needs the exported bundles

QUANT_RECIPE = "8da4w-emb4"
DEVICE = "android-flagship"
DECODE_STEPS = 64


def _plan(checkpoint: Path, recipe: str, modalities: str):
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    plan = make_plan(checkpoint, profile=load_profiles().get(DEVICE), recipe_name=recipe, modalities=modalities,
                     context=CONTEXT)
    return dataclasses.replace(plan, vision_token_budget=VISION_BUDGET)


# --- fixtures (the bundles themselves: tests/conftest.py executorch_bundles) -------------------

@pytest.fixture(scope="module")
def e2b(tiny_e2b):
    return load(tiny_e2b).reference_model()


class _Program:
    """A bundle's program as the runner holds it (runtimes/backends/executorch_backend.py):
    ExecuTorch's Module, planned memory per method. (runtime.Runtime's programs share one set
    of arenas among their methods, where text_decoder keeps its KV cache.)"""

    def __init__(self, bundle) -> None:
        from edgekit.runtimes.backends.executorch_backend import ExecutorchBackend

        self._module = ExecutorchBackend(bundle)._module  # the runner's own Module, kernels registered

    @property
    def method_names(self) -> set[str]:
        return set(self._module.method_names())

    def load_method(self, name: str):
        module = self._module
        return SimpleNamespace(execute=lambda inputs: module.run_method(name, inputs))


_program = _Program


@pytest.fixture(scope="module")
def fp32(executorch_bundles):
    return executorch_bundles["fp32"], _program(executorch_bundles["fp32"])


@pytest.fixture(scope="module")
def e4b_program(executorch_bundles):
    return executorch_bundles["e4b"], _program(executorch_bundles["e4b"])


class Session:
    """A minimal runner: token_embedding + text_decoder in chunks of get_max_seq_len.

    `embed` and `decode` are the program's methods, or eager modules for a reference run.
    """

    def __init__(self, program=None, *, embed=None, decode=None, chunk: int | None = None) -> None:
        if program is not None:
            embed_method = program.load_method(METHOD_TOKEN_EMBEDDING)
            decode_method = program.load_method(METHOD_TEXT_DECODER)
            embed = lambda ids: embed_method.execute([ids])[0]  # noqa: E731
            decode = lambda e, pos: decode_method.execute([e, pos])[0]  # noqa: E731
            chunk = int(program.load_method(meta.GET_MAX_SEQ_LEN).execute([])[0])
        self.embed, self.decode, self.chunk, self.pos = embed, decode, chunk, 0

    def feed_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        for start in range(0, embeds.shape[1], self.chunk):
            part = embeds[:, start:start + self.chunk].contiguous()
            logits = self.decode(part, torch.arange(self.pos, self.pos + part.shape[1]))
            self.pos += part.shape[1]
        return logits

    def embeds(self, ids: list[int]) -> torch.Tensor:
        return torch.cat([self.embed(torch.tensor([ids[i:i + self.chunk]])) for i in range(0, len(ids), self.chunk)],
                         dim=1)

    def feed(self, ids: list[int]) -> torch.Tensor:
        return self.feed_embeds(self.embeds(ids))


def _greedy(session: Session, prompt: list[int], steps: int,
            forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits [steps, V] they came from (`forced`: feed these instead)."""
    logits, tokens, all_logits = session.feed(prompt), [], []
    for step in range(steps):
        all_logits.append(logits[0])
        tokens.append(int(logits.argmax()))
        logits = session.feed([forced[step] if forced else tokens[-1]])
    return tokens, torch.stack(all_logits)


def _prompt(vocab: int, n: int = 20) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


# --- eager unit tests (no lowering) ---------------------------------------------------------

def test_xnnpack_module_swaps_keep_transformers_numerics(e2b):
    from edgekit.export.executorch.methods import text_decoder, token_embedding
    from edgekit.export.executorch.xnnpack_modules import TanhGELU, XnnpackRMSNorm, swap_for_xnnpack

    x = torch.randn(4, 64) * 4
    torch.testing.assert_close(TanhGELU()(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)
    build, embed = text_decoder(e2b, max_context=CONTEXT, max_seq_len=16), token_embedding(e2b, max_seq_len=16)
    swapped = swap_for_xnnpack(build.module, build.example_inputs)
    build.module.decoder.reset_cache()
    assert any(isinstance(m, XnnpackRMSNorm) for m in swapped.modules())
    assert not any(isinstance(m, XnnpackRMSNorm) for m in e2b.modules())  # the reference is left alone
    ids = torch.tensor([_prompt(e2b.config.text_config.vocab_size, 12)])
    with torch.no_grad():
        got = swapped(embed.module(ids), torch.arange(12))
        reference = e2b(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


def test_big_tables_are_quantized_in_column_blocks(e2b):
    """Tables over the size limit (the 2.35 B E2B PLE table overflows torchao) split by columns."""
    import copy

    from edgekit.export.executorch.quantize import ColumnSplitEmbedding, QuantReport, quantize_table
    from edgekit.recipes import INT4_EMB_G32

    table = e2b.model.language_model.embed_tokens_per_layer
    whole = quantize_table(copy.deepcopy(table), scheme=INT4_EMB_G32, report=QuantReport(), kind_key="ple")
    report = QuantReport()
    split = quantize_table(copy.deepcopy(table), scheme=INT4_EMB_G32, report=report, kind_key="ple",
                           max_elements=table.weight.shape[0] * 64)
    assert isinstance(split, ColumnSplitEmbedding) and len(split.parts) == -(-table.weight.shape[1] // 64)
    ids = torch.tensor([[0, 5, 4095]])
    with torch.no_grad():
        torch.testing.assert_close(split(ids), whole(ids))
        assert torch.nn.functional.cosine_similarity(split(ids), table(ids), dim=-1).min() > 0.98
    assert report.quantized == len(split.parts)


@pytest.mark.parametrize("scheme", ["int4-emb-g32", "int2-emb-g64"])
def test_quantized_tables_run_in_executorch_at_their_stated_bits(scheme, tmp_path):
    """A table quantized by a scheme with fp16 scales runs through ExecuTorch's
    embedding_{4,2}bit kernels exactly as torchao computes it eagerly, and the .pte holds the
    scheme's bits per weight (fp16 scales under an fp32 table gave inf/nan: see quantize.py)."""
    import executorch.kernels.quantized  # noqa: F401

    from edgekit.export.executorch.lower import lower_to_pte
    from edgekit.export.executorch.quantize import QuantReport, quantize_table
    from edgekit.recipes import INT2_EMB_G64, INT4_EMB_G32

    scheme = {s.name: s for s in (INT4_EMB_G32, INT2_EMB_G64)}[scheme]
    rows, cols = 2048, 256
    torch.manual_seed(0)
    table = torch.nn.Embedding(rows, cols, _weight=torch.randn(rows, cols, dtype=torch.bfloat16))
    reference = table.weight.detach().float()
    quantized = quantize_table(table, scheme=scheme, report=QuantReport(), kind_key="t",
                               max_elements=rows * cols // 2)  # two column blocks
    ids = torch.tensor([[0, 7, 2047, 1000, 7]])
    lowered = lower_to_pte({"forward": torch.export.export(quantized, (ids,), strict=True)}, constant_methods={},
                           out=tmp_path / "t.pte")
    assert f"quantized_decomposed::embedding_{scheme.weight_bits}bit" in lowered["forward"].kernels
    got = runtime.Runtime.get().load_program(str(tmp_path / "t.pte")).load_method("forward").execute([ids])[0]
    with torch.no_grad():
        assert torch.equal(got, quantized(ids))
    stored_bits = (tmp_path / "t.pte").stat().st_size * 8 / (rows * cols)
    assert scheme.bits_per_weight <= stored_bits < scheme.bits_per_weight + 0.1, stored_bits
    # Gaussian rows: measured mean cosine 0.995 at 4 bits, 0.885 at 2 bits (group 64)
    cos = torch.nn.functional.cosine_similarity(got[0], reference[ids[0]], dim=-1).mean()
    assert cos > (0.99 if scheme.weight_bits == 4 else 0.85), cos


def test_missing_tower_is_a_one_line_error_before_any_work(tiny_e2b, tmp_path):
    """The plan refuses a modality the checkpoint has no tower for, before anything loads;
    the exporters take the plan's word for it."""
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.errors import InputError
    from edgekit.models.gemma4.presets import PRESETS

    no_audio = make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "no-audio", seed=0, audio=False)
    with pytest.raises(InputError) as err:
        _plan(no_audio, "fp32", "text,audio")
    message = str(err.value)
    assert "\n" not in message and "no audio tower" in message and "drop audio from --modalities" in message


# --- fp32 bundle -----------------------------------------------------------------------------

@slow
def test_manifest_describes_the_program(fp32, tiny_e2b):
    from edgekit.export import bundle_metadata

    bundle, _ = fp32
    m = bundle.manifest
    assert (m.format, m.backend, m.max_context) == ("executorch", "xnnpack", CONTEXT)
    assert [x.name for x in m.methods] == [METHOD_TOKEN_EMBEDDING, METHOD_TEXT_DECODER, METHOD_VISION_ENCODER,
                                          METHOD_AUDIO_ENCODER, METHOD_AUDIO_PREPROCESSOR]
    assert {f.path for f in m.files} >= {"model.pte", "tokenizer.json"}
    assert m.special_tokens == bundle_metadata.special_tokens(load(tiny_e2b))
    decoder = m.method(METHOD_TEXT_DECODER)
    assert [t.shape for t in decoder.inputs] == [(1, "seq_len", 64 + 10 * 16), ("seq_len",)]
    assert decoder.outputs[0].shape == (1, 4096)
    # The stock runner feeds an image's soft tokens in one call: at least the budget a call.
    assert decoder.extra["max_seq_len"] == m.extra["max_seq_len"] == m.prefill_chunk == VISION_BUDGET
    assert decoder.extra["kv_cache_slots"] == {"full_attention": CONTEXT, "sliding_attention": 16 + VISION_BUDGET - 1}
    assert m.method(METHOD_AUDIO_ENCODER).inputs[0].shape == (1, 128, "num_frames")
    assert m.method(METHOD_VISION_ENCODER).inputs[0].shape == (1, 3, "image_height", "image_width")
    assert m.recipe == "fp32" and m.quant_schemes[METHOD_TEXT_DECODER] == "fp32"
    assert m.extra["packed_ple"]["per_layer_inputs"] == [64, 64 + 160]
    assert m.audio_preprocessing is not None and m.image_preprocessing.max_soft_tokens == VISION_BUDGET
    # Norm and GELU swaps keep the decoder in few XNNPACK delegates (200 without them).
    assert set(decoder.extra["delegates"]) == {"XnnpackBackend"} and decoder.extra["delegates"]["XnnpackBackend"] <= 30
    # Global layers attend through ExecuTorch's LLM custom ops, which an app must link.
    assert {"llama::update_cache", "llama::custom_sdpa"} <= set(decoder.extra["kernels"])
    json.dumps(m.to_dict())


@slow
def test_metadata_methods(fp32):
    bundle, program = fp32
    tokens = bundle.manifest.special_tokens
    assert set(meta.METADATA_METHODS) <= set(program.method_names)

    def value(name):
        return [int(v) for v in program.load_method(name).execute([])]

    # The vision budget (70): the stock runner feeds an image's soft tokens in one call, more
    # than min(context, 128, sliding window 16) would give.
    assert value(meta.GET_MAX_SEQ_LEN) == [70] == [bundle.manifest.prefill_chunk]
    assert value(meta.GET_MAX_CONTEXT_LEN) == [CONTEXT]
    assert value(meta.GET_BOS_ID) == [tokens.bos_id]
    assert value(meta.GET_EOS_IDS) == list(tokens.eos_ids)
    assert value(meta.GET_VOCAB_SIZE) == [4096]
    assert value(meta.USE_KV_CACHE) == [1] and value(meta.ENABLE_DYNAMIC_SHAPE) == [1]


@slow
def test_greedy_decode_matches_transformers(fp32, e2b):
    """20-token prompt (chunks of 16) + 64 greedy steps: past the window, twice around the ring."""
    _, program = fp32
    prompt = _prompt(e2b.config.text_config.vocab_size)
    tokens, logits = _greedy(Session(program), prompt, DECODE_STEPS)
    with torch.no_grad():
        reference = e2b(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    assert tokens == reference.argmax(-1).tolist()
    rel = float(((logits - reference).abs().amax(-1) / reference.abs().amax(-1)).max())
    assert rel < 1e-3, rel  # measured 8e-6


@slow
def test_new_conversation_restarts_at_position_zero(fp32, e2b):
    _, program = fp32
    session = Session(program)
    session.feed(_prompt(4096, 50))
    session.pos = 0  # no reset: the cache's stale slots are masked by position
    ids = _prompt(4096, 7)[::-1]
    got = session.feed(ids)
    with torch.no_grad():
        reference = e2b(input_ids=torch.tensor([ids])).logits[0, -1]
    assert float((got[0] - reference).abs().max() / reference.abs().max()) < 1e-3


@slow
def test_vision_encoder_matches_eager_and_carries_the_pad_row(fp32, e2b):
    from edgekit.export.components.token_embedding import TokenEmbedding
    from edgekit.export.components.vision_encoder import VisionEncoder

    _, program = fp32
    encoder = VisionEncoder(e2b, max_soft_tokens=VISION_BUDGET).eval()
    method = program.load_method(METHOD_VISION_ENCODER)
    hidden = e2b.config.text_config.hidden_size
    pad_row = TokenEmbedding(e2b)(torch.tensor([[e2b.config.text_config.pad_token_id]]))[1][0, 0]
    for size in ((100, 150), (300, 40), (48, 48)):  # what the stock runner passes: the resized uint8 image
        image, pixels, positions, n = _stock_image(size)
        tokens = method.execute([image])[0]
        with torch.no_grad():
            want, want_valid = encoder(pixels, positions)
        assert tokens.shape == (1, n, hidden + 160) and int(want_valid.sum()) == n
        torch.testing.assert_close(tokens[..., :hidden], want[:, :n], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[0, :, hidden:], pad_row.expand(n, -1))



def _stock_image(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A random (height, width) image as the stock runner passes it (resized uint8 [1, 3, H, W])
    and as the processor's patches and positions, with its soft-token count."""
    from PIL import Image

    from edgekit.runtimes.image_preprocess import ImageParams, preprocess_image, resized_rgb

    params = ImageParams(max_soft_tokens=VISION_BUDGET)
    picture = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    rgb = resized_rgb(picture, params=params)
    pixels, positions, n = preprocess_image(picture, params=params)
    return (torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None], torch.from_numpy(pixels),
            torch.from_numpy(positions), n)

@slow
def test_encoder_calls_between_decoder_calls_leave_the_kv_cache_alone(executorch_bundles, e2b):
    """Sharing one program instance, vision_encoder's activations would land on text_decoder's
    cache (the bindings' shared arenas): an image in the middle of a conversation broke it."""
    from edgekit.export.components.audio_encoder import AudioEncoder
    from edgekit.runtimes.backends.executorch_backend import ExecutorchBackend

    backend = ExecutorchBackend(executorch_bundles["fp32"])
    prompt = np.array(_prompt(4096, 12))  # one call (max_seq_len 16)
    backend.forward(prompt)
    want = backend.forward(np.array([7]))
    backend.reset()
    backend.forward(prompt)
    _, pixels, positions, _ = _stock_image((100, 150))
    backend.encode_image(pixels.numpy(), positions.numpy())
    backend.encode_audio(*(t[0].numpy() for t in AudioEncoder(e2b).example_inputs(200)))
    assert np.array_equal(backend.forward(np.array([7])), want)


@slow
def test_calls_past_the_programs_limits_are_clear_errors(executorch_bundles):
    """More tokens than one call takes, or than the context holds: InputError before the
    program runs (a kernel would fail, or without the LLM ops write past the cache)."""
    from edgekit.errors import InputError
    from edgekit.runtimes.backends.executorch_backend import ExecutorchBackend

    backend = ExecutorchBackend(executorch_bundles["fp32"])
    limit, context = backend.max_prefill_tokens, executorch_bundles["fp32"].manifest.max_context
    with pytest.raises(InputError, match="at most"):
        backend.forward(np.arange(limit + 1) + 300)
    for start in range(0, context - 1, limit):
        backend.forward(np.arange(start, min(start + limit, context - 1)) + 300)
    assert backend.position == context - 1
    with pytest.raises(InputError, match="context"):
        backend.forward(np.array([300, 301]))
    backend.forward(np.array([300]))  # the last slot
    assert backend.position == context


@slow
def test_a_runtime_without_the_llm_custom_ops_is_a_clear_error(executorch_bundles, monkeypatch):
    from edgekit.errors import NotAvailableError
    from edgekit.runtimes.backends import executorch_backend

    monkeypatch.setattr(executorch_backend, "llm_ops_library", lambda: None)  # an executorch install without them
    with pytest.raises(NotAvailableError, match="LLM custom ops"):
        executorch_backend.ExecutorchBackend(executorch_bundles["fp32"])


@slow
def test_audio_encoder_is_dynamic_and_matches_eager(fp32, e2b):
    from edgekit.export.components.audio_encoder import AudioEncoder

    _, program = fp32
    encoder = AudioEncoder(e2b).eval()
    method = program.load_method(METHOD_AUDIO_ENCODER)
    hidden = e2b.config.text_config.hidden_size
    for frames in (encoder.min_frames, 200, 412):
        features, mask = encoder.example_inputs(frames)
        tokens = method.execute([features[:, mask[0]].transpose(1, 2).contiguous()])[0]  # the real frames, bins first
        with torch.no_grad():
            want, want_mask = encoder(features, mask)
        assert tokens.shape == (1, int(want_mask.sum()), hidden + 160)
        torch.testing.assert_close(tokens[..., :hidden], want[want_mask][None], atol=1e-4, rtol=1e-4)


@slow
def test_waveform_to_soft_tokens_inside_the_program(fp32, e2b, tiny_e2b):
    """audio_preprocessor -> audio_encoder, all in the .pte: features as transformers' extractor
    computes them, soft tokens as its audio tower does."""
    from transformers import AutoFeatureExtractor

    from edgekit.export.verify import test_audio
    bundle, program = fp32
    clip = test_audio(1.7)
    padded = torch.zeros(-(-len(clip) // 128) * 128)
    padded[: len(clip)] = torch.from_numpy(clip)
    features, mask = program.load_method(METHOD_AUDIO_PREPROCESSOR).execute([padded, torch.tensor([len(clip)])])
    reference = AutoFeatureExtractor.from_pretrained(str(tiny_e2b))([clip], return_tensors="pt")
    assert torch.equal(mask, reference["input_features_mask"])
    assert float((features - reference["input_features"]).abs().max()) < 5e-4  # fp32 DFT as a matmul
    tokens = program.load_method(METHOD_AUDIO_ENCODER).execute([features[:, mask[0]].transpose(1, 2).contiguous()])[0]
    with torch.no_grad():
        out = e2b.model.get_audio_features(reference["input_features"], reference["input_features_mask"])
        want = out.pooler_output[out.attention_mask]
    got = tokens[0][:, : e2b.config.text_config.hidden_size]
    assert got.shape == want.shape
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min()) > 0.9999


@slow
def test_image_prompt_through_packed_embeddings_matches_transformers(fp32, e2b):
    """vision_encoder rows replace the placeholders in token_embedding's output; PLE rows included."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    _, program = fp32
    cfg = e2b.config
    image, _, _, _ = _stock_image((100, 150))
    rows = program.load_method(METHOD_VISION_ENCODER).execute([image])[0][0]
    ids = [2, 11, cfg.boi_token_id, *[cfg.image_token_id] * rows.shape[0], cfg.eoi_token_id, 12, 13]
    session = Session(program)
    embeds = session.embeds(ids)
    slots = torch.tensor(ids) == cfg.image_token_id
    embeds[0, slots] = rows
    got = session.feed_embeds(embeds)
    hidden = cfg.text_config.hidden_size
    with torch.no_grad():
        image = BaseModelOutputWithPooling(pooler_output=[rows[:, :hidden]])
        reference = e2b(input_ids=torch.tensor([ids]), mm_encoder_outputs={"image": image}).logits[0, -1]
    assert float((got[0] - reference).abs().max() / reference.abs().max()) < 1e-3


# --- quantized bundle ------------------------------------------------------------------------

@slow
def test_verify_runs_the_program_against_transformers(executorch_bundles, tiny_e2b):
    """`edgekit verify` on a .pte: the ExecuTorch runtime vs eager transformers, report saved."""
    from tests.conftest import run_cli

    bundle = executorch_bundles["fp32"]
    result = run_cli("verify", str(bundle.path), "--reference", str(tiny_e2b), "--json", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    decoder = report["methods"][METHOD_TEXT_DECODER]
    saved = json.loads((bundle.path / "manifest.json").read_text())["verification"]
    assert saved["passed"] and saved["methods"][METHOD_TEXT_DECODER] == decoder
    # image + audio + text prompt, 64 greedy steps (fp32 bounds: identical tokens, 1e-3 relative)
    assert decoder["token_agreement"] == 1.0 and decoder["max_rel_diff"] < 1e-3, decoder
    assert report["methods"][METHOD_VISION_ENCODER]["cosine"] > 0.9999
    assert report["methods"][METHOD_AUDIO_ENCODER]["cosine"] > 0.9999


@slow
def test_tiny_e4b_exports_every_method_and_verifies(executorch_bundles, tiny_e4b):
    """E4B's layout (other widths, 24 of 42-style KV owners, its own layer pattern) through
    `edgekit export --device android-flagship` and `edgekit verify` (quantized bounds)."""
    from tests.conftest import run_cli

    bundle = executorch_bundles["e4b"]
    m = bundle.manifest
    assert [x.name for x in m.methods] == [METHOD_TOKEN_EMBEDDING, METHOD_TEXT_DECODER, METHOD_VISION_ENCODER,
                                          METHOD_AUDIO_ENCODER, METHOD_AUDIO_PREPROCESSOR]
    text = load(tiny_e4b).text_config
    packed = text["hidden_size"] + text["num_hidden_layers"] * text["hidden_size_per_layer_input"]
    assert m.recipe == QUANT_RECIPE
    assert m.method(METHOD_TEXT_DECODER).inputs[0].shape == (1, "seq_len", packed)
    result = run_cli("verify", str(bundle.path), "--reference", str(tiny_e4b), "--json", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["passed"] and report["methods"][METHOD_TEXT_DECODER]["min_cosine"] >= report["bounds"]["min_cosine"]
    assert report["bounds"]["min_cosine"] >= 0.9, report["bounds"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_or_disk_full_export_leaves_nothing(tiny_e2b_4layers, tmp_path, monkeypatch, failure):
    from edgekit.errors import ExportError
    from edgekit.export.executorch import exporter

    def half_written(programs, *, out, **kwargs):
        out.write_bytes(b"\0" * 4096)  # the start of a .pte, then the failure
        raise failure

    monkeypatch.setattr(exporter, "lower_to_pte", half_written)
    out = tmp_path / "out"
    out.mkdir()
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else ExportError
    with pytest.raises(expected) as info:
        exporter.export_executorch(load(tiny_e2b_4layers), plan=_plan(tiny_e2b_4layers, "fp32", "text"),
                                   output=out / "b.edgekit")
    if expected is ExportError:
        assert "disk full" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == []  # no bundle, no temporary directory


def test_unsupported_recipe_lists_the_executorch_ones(tiny_e2b, tmp_path):
    from tests.conftest import assert_clean_failure, run_cli

    result = run_cli("export", str(tiny_e2b), "--device", "android-flagship", "--quant", "int4",
                     "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=2, contains="choose one of: fp32, 8da4w")
    assert not (tmp_path / "b.edgekit").exists()


@slow
def test_verify_refuses_steps_past_the_context(executorch_bundles, tiny_e2b):
    from tests.conftest import assert_clean_failure, run_cli

    bundle = executorch_bundles["fp32"]
    result = run_cli("verify", str(bundle.path), "--reference", str(tiny_e2b), "--steps", str(CONTEXT))
    assert_clean_failure(result, code=2, contains=f"fill the bundle's context of {CONTEXT} tokens")


@slow
def test_cli_export_uses_the_profiles_recipe(executorch_bundles):
    summary = executorch_bundles["e4b_summary"]
    assert (summary["format"], summary["recipe"]) == ("executorch", QUANT_RECIPE)
    assert set(summary["modalities"]) == {"text", "audio", "vision"}  # the profile's default
    bundle = executorch_bundles["e4b"]
    assert summary["bytes"] == bundle.manifest.total_size and bundle.manifest.device == DEVICE


@slow
def test_external_weights_live_in_the_ptd(executorch_bundles):
    """--external-weights: the quantized embedding tables (and the decoder's constants outside
    XNNPACK) go to model.ptd; the .pte alone cannot load those methods, with the .ptd every
    e4b test runs."""
    import executorch.kernels.quantized  # noqa: F401

    bundle = executorch_bundles["e4b"]
    assert bundle.manifest.extra["program_data"] == "model.ptd"
    ptd, pte = bundle.file("model.ptd"), bundle.file("model.pte")
    assert ptd.stat().st_size > 0 and "model.ptd" in {f.path for f in bundle.manifest.files}
    alone = runtime.Runtime.get().load_program(str(pte))
    for method in (METHOD_TOKEN_EMBEDDING, METHOD_TEXT_DECODER):
        with pytest.raises(RuntimeError):
            alone.load_method(method)
    assert executorch_bundles["fp32"].manifest.extra.get("program_data") is None  # the default: one .pte


@slow
def test_quantized_program_matches_the_eager_recipe(e4b_program, tiny_e4b):
    """The .pte computes what torchao's quantized modules compute (lowering adds ~no error),
    and stays near fp32 (a loose bound: random weights, see below)."""
    from edgekit.export.executorch.exporter import build_methods

    bundle, program = e4b_program
    m = bundle.manifest
    assert m.quant_schemes[METHOD_TEXT_DECODER] == "8da4w-g32"
    assert m.quant_schemes[METHOD_TOKEN_EMBEDDING] == "int4-emb-g32"
    assert "quantized_decomposed::embedding_4bit" in m.method(METHOD_TOKEN_EMBEDDING).extra["kernels"]

    plan = _plan(tiny_e4b, QUANT_RECIPE, "text,audio,vision")
    builds, _ = build_methods(load(tiny_e4b).reference_model(), plan, seq_len=16)
    embed, decoder = builds[METHOD_TOKEN_EMBEDDING].module, builds[METHOD_TEXT_DECODER].module
    prompt = _prompt(4096)
    tokens, logits = _greedy(Session(program), prompt, 32)
    with torch.no_grad():
        eager_tokens, eager = _greedy(Session(embed=embed, decode=decoder, chunk=16), prompt, 32, forced=tokens)
        reference_model = load(tiny_e4b).reference_model()
        fp32_logits = reference_model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    cos = torch.nn.functional.cosine_similarity(logits, eager, dim=-1)
    # XNNPACK quantizes activations with its own rounding: measured min cosine 0.99996 (tiny-e4b).
    assert cos.min() > 0.9995, cos.min()
    assert sum(a == b for a, b in zip(tokens, eager_tokens)) >= 30  # measured 32/32; near-ties may differ by CPU
    # Against fp32, on random weights (sensitive: 0.5% weight noise gives tiny-e2b a min
    # cosine of 0.97): measured mean 0.9960, min 0.9954 over these 32 steps of tiny-e4b.
    vs_fp32 = torch.nn.functional.cosine_similarity(logits, fp32_logits, dim=-1)
    assert vs_fp32.mean() > 0.99, vs_fp32.mean()


_RUN_ONLY = """
import json, sys
import numpy as np
from edgekit.bundle import load_bundle
from edgekit.runtimes.backends import open_backend
logits = open_backend(load_bundle(sys.argv[1])).forward(np.array([2, 10, 11, 12]))[-1]
print(json.dumps({"exir": "executorch.exir" in sys.modules, "torchao": "torchao" in sys.modules,
                  "logits": logits[:64].tolist()}))
"""


def test_a_process_that_only_runs_a_bundle_never_imports_the_compiler(executorch_bundles):
    """ExecuTorch's pybindings would run the whole executorch.exir package (the compiler and
    torchao: +129 MiB, 2.5 s); the backend loads the runtime without it, and computes the same
    logits as this process, where the exporter loaded the compiler."""
    import subprocess
    import sys

    import numpy as np

    from edgekit.runtimes.backends import open_backend

    bundle = executorch_bundles["fp32"]
    expected = open_backend(bundle).forward(np.array([2, 10, 11, 12]))[-1][:64]
    done = subprocess.run([sys.executable, "-c", _RUN_ONLY, str(bundle.path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exir"] is False and result["torchao"] is False
    np.testing.assert_allclose(result["logits"], expected, rtol=1e-6, atol=1e-6)


_LOAD_AND_REPORT_LOCKED = """
import contextlib, json, sys
import numpy as np
from edgekit.bundle import load_bundle
from edgekit.runtimes.backends import executorch_backend, open_backend
from edgekit.runtimes.no_mlock import ipc_lock_effective
if sys.argv[2] == "unguarded":
    executorch_backend.mlock_disabled = contextlib.nullcontext
backend = open_backend(load_bundle(sys.argv[1]))
backend.forward(np.array([2, 10, 11, 12]))
status = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmLck")}
print(json.dumps({"locked_kib": status["VmLck"], "ipc_lock": ipc_lock_effective()}))
"""


def test_runner_run_as_root_does_not_lock_the_program_into_ram(executorch_bundles):
    """As root (CAP_IPC_LOCK) the bindings' mlock would pin every segment they load, the
    tables of which a token reads a few rows included; the backend loads without the
    capability (runtimes/no_mlock.py) and gives it back."""
    import subprocess
    import sys

    from edgekit.runtimes.no_mlock import ipc_lock_effective

    if not ipc_lock_effective():
        pytest.skip("needs CAP_IPC_LOCK (root) for mlock to succeed at all")
    bundle = executorch_bundles["e4b"]
    table_kib = sum(f.stat().st_size for f in bundle.path.iterdir() if f.suffix in (".pte", ".ptd")) // 1024

    def locked(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _LOAD_AND_REPORT_LOCKED, str(bundle.path), mode],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    guarded, unguarded = locked("guarded"), locked("unguarded")
    assert unguarded["locked_kib"] > table_kib // 4, (unguarded, table_kib)  # what the guard prevents
    assert guarded["locked_kib"] <= 8 * 1024, guarded  # RLIMIT_MEMLOCK's default at most
    assert guarded["ipc_lock"] and unguarded["ipc_lock"]  # given back after loading
