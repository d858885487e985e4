"""Core ML bundles, end to end on Linux: real exports of tiny-e2b / tiny-e4b with every modality
(background processes, tests/conftest.py coreml_exports), their saved programs evaluated op by
op in numpy (edgekit.export.coreml.mil_eval) by `verify` against transformers, and the bad
inputs of the format. Row-file tables are checked against a numpy quantizer directly.

Skipped where coremltools is missing (it is part of the export extra).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgekit.errors import BundleError, InputError
from edgekit.runtimes.embedding_tables import EmbeddingTable, TableLayout, decode_rows
from tests.conftest import assert_clean_failure, run_cli

pytest.importorskip("coremltools")


# --- embedding tables as row files --------------------------------------------------------

@pytest.mark.parametrize("dtype,group", [("float32", 96), ("float16", 96), ("int8", 96), ("int8", 32), ("int4", 32), ("int4", 96),
                                         ("int2", 32)])
def test_rows_decode_to_the_symmetric_quantization_of_the_values(tmp_path, dtype, group):
    from edgekit.export.coreml.embedding_tables import encode_rows

    rng = np.random.default_rng(0)
    values = rng.standard_normal((7, 96)).astype(np.float32) * rng.uniform(0.1, 3, (7, 1)).astype(np.float32)
    layout = TableLayout(7, 96, dtype, group)
    raw = encode_rows(values, layout)
    assert raw.shape == (7, layout.row_bytes) and raw.dtype == np.uint8
    got = decode_rows(raw, layout)
    if dtype in ("float32", "float16"):
        np.testing.assert_array_equal(got, values.astype(dtype).astype(np.float32))
        return
    blocks = values.reshape(7, -1, group)
    if dtype == "int2":  # levels -2..1: the scale covers both ends
        low, high = -2, 1
        scale = np.maximum(-blocks.min(-1, keepdims=True) / 2, blocks.max(-1, keepdims=True))
    else:
        high = 127 if dtype == "int8" else 7
        low, scale = -high, np.abs(blocks).max(-1, keepdims=True) / high
    scale = scale.astype(np.float16).astype(np.float32)
    expected = (np.clip(np.rint(blocks / scale), low, high) * scale).reshape(7, 96)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(got - values).max() <= scale.max() / 2 * 1.01  # round to nearest, the ends inside


def test_a_table_reads_only_whole_rows_of_its_own_file(tmp_path):
    from edgekit.export.coreml.embedding_tables import encode_rows

    layout = TableLayout(5, 64, "int4", 32)
    path = tmp_path / "t.bin"
    path.write_bytes(encode_rows(np.ones((5, 64), np.float32), layout).tobytes())
    table = EmbeddingTable(path, layout)
    np.testing.assert_allclose(table.lookup(np.array([4, 0])), np.ones((2, 64)), rtol=1e-3)  # scale 1/7 in fp16
    with pytest.raises(InputError, match="token id 5 is outside the vocabulary"):
        table.lookup(np.array([1, 5]))
    with pytest.raises(InputError, match="token id -1"):
        table.lookup(np.array([-1]))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BundleError, match="makes 180"):
        EmbeddingTable(path, layout)
    with pytest.raises(BundleError, match="multiple of group_size"):
        TableLayout(5, 64, "int4", 48)
    with pytest.raises(BundleError, match="says 99 bytes per row"):
        TableLayout.from_dict({**layout.to_dict(), "row_bytes": 99})


# --- the decoder's head, in blocks a conversion handles whole --------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_head_in_row_blocks_computes_the_tied_head(dtype):
    import torch

    from edgekit.export.coreml.decoder import HEAD_ROWS_PER_PART, SplitHead

    torch.manual_seed(0)
    weight = torch.randn(2 * HEAD_ROWS_PER_PART + 5, 24, dtype=torch.bfloat16)  # as released: bf16
    x = torch.randn(1, 3, 24)
    head = SplitHead(weight, dtype=getattr(torch, dtype))
    assert [p.shape[0] for p in head.parts] == [HEAD_ROWS_PER_PART, HEAD_ROWS_PER_PART, 5]
    assert all(p.dtype == getattr(torch, dtype) for p in head.parts)
    got = head(x)
    assert got.dtype == torch.float32 and got.shape == (1, 3, weight.shape[0])
    if dtype == "float32":
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight.float()), rtol=0, atol=1e-5)
    else:  # what an fp16 program computes: fp16 operands
        expected = torch.nn.functional.linear(x.half(), weight.half()).float()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rotary_angles_are_looked_up_not_computed_in_fp16(tiny_e2b):
    """An fp16 program computing position x frequency is off by up to p * 2^-11 radians; the
    decoder looks cos/sin up in fp32-computed tables instead, equal to transformers' at any
    position, 2048 and past included (where fp16 stops holding every integer)."""
    import torch

    from edgekit.checkpoint import load
    from edgekit.export.coreml.decoder import StatefulTextDecoder

    model = load(tiny_e2b).reference_model()
    context = 4096
    decoder = StatefulTextDecoder(model, max_context=context, max_seq_len=8, precision="float16")
    positions = torch.tensor([[0, 1, 700, 2047, 2049, 3001, context - 1]])
    probe = torch.zeros(1, 1)
    for kind in set(decoder.layout.layer_types):
        got = decoder._rope(probe, positions, kind)
        expected = model.model.language_model.rotary_emb(probe, positions, kind)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- exported bundles, verified against transformers ---------------------------------------

def test_iphone_export_with_the_profiles_defaults_verifies(coreml_bundles, tiny_e2b):
    from edgekit.checkpoint import load
    from edgekit.export.coreml.mil_eval import SavedProgram
    from edgekit.export.verify import bounds_for, verify_bundle

    bundle, summary = coreml_bundles["e2b"]
    manifest = bundle.manifest
    assert (manifest.format, manifest.recipe, summary["modalities"]) == ("coreml", "int4-ple2",
                                                                         ["text", "audio", "vision"])
    assert {m.name: m.file for m in manifest.methods} == {
        "text_decoder": "text_decoder.mlpackage", "vision_encoder": "vision_encoder.mlpackage",
        "audio_encoder": "audio_encoder.mlpackage"}
    decoder = manifest.method("text_decoder").extra
    assert decoder["functions"] == {"prefill": manifest.prefill_chunk, "decode": 1}
    assert set(manifest.extra["embedding_tables"]) == {"token_embedding", "per_layer_embedding"}
    program = SavedProgram(bundle.file("text_decoder.mlpackage"))
    for function in ("prefill", "decode"):  # rotary cos/sin are looked up, never computed in fp16
        assert {"gather", "linear"} <= program.op_types(function) and not {"sin", "cos"} & program.op_types(function)
    report = verify_bundle(bundle.path, load(tiny_e2b), steps=64)
    assert report["passed"], report["failures"]
    assert report["bounds"] == dataclasses.asdict(bounds_for("int4-ple2"))
    assert report["methods"]["text_decoder"]["token_agreement"] == 1.0  # measured: 64 of 64 steps
    for method in ("vision_encoder", "audio_encoder"):  # 4-bit towers: measured 0.953 and 0.934
        assert report["methods"][method]["cosine"] > 0.92, report["methods"][method]


def test_fp16_e4b_bundle_matches_transformers_to_fp16(coreml_bundles, tiny_e4b):
    from edgekit.checkpoint import load
    from edgekit.export.verify import verify_bundle

    bundle, _ = coreml_bundles["e4b"]
    report = verify_bundle(bundle.path, load(tiny_e4b), steps=64, save=False)
    assert report["passed"], report["failures"]
    decoder = report["methods"]["text_decoder"]
    assert decoder["token_agreement"] == 1.0 and decoder["min_cosine"] > 0.9995, decoder  # fp16 compute
    for method in ("vision_encoder", "audio_encoder"):
        assert report["methods"][method]["cosine"] > 0.9999, report["methods"][method]


def test_int8_per_channel_keeps_one_scale_per_output_row_and_verifies(plan_size_bundle, plan_size_checkpoint):
    """The int8-channel recipe, on the plan-size checkpoint's export (tests/plan_sizes.py, real
    widths, 1 layer): every linear's int8 weight has one scale per output row, the tables one
    per row, and the program matches transformers within int8's bounds."""
    from edgekit.checkpoint import load
    from edgekit.export.coreml.mil_eval import _load_program
    from edgekit.export.verify import verify_bundle
    from tests.plan_sizes import Case

    bundle = plan_size_bundle(Case("coreml", "coreml", "int8-channel"))
    manifest = bundle.manifest
    assert set(manifest.quant_schemes.values()) == {"int8"}
    for table in manifest.extra["embedding_tables"].values():
        assert (table["dtype"], table["group_size"]) == ("int8", table["columns"])
    program = _load_program(bundle.file("text_decoder.mlpackage"))
    scales = [op.scale.val for op in program.functions["decode"].operations
              if op.op_type == "constexpr_blockwise_shift_scale"]
    weights = [op.data.val for op in program.functions["decode"].operations
               if op.op_type == "constexpr_blockwise_shift_scale"]
    assert scales and all(s.shape == (w.shape[0], 1) for s, w in zip(scales, weights))
    report = verify_bundle(bundle.path, load(plan_size_checkpoint), steps=16, save=False)
    assert report["passed"], report["failures"]


def test_a_short_chunk_padded_to_the_prefill_size_equals_feeding_it_token_by_token(coreml_bundles):
    from edgekit.export.coreml.program_check import backend_for_verify

    bundle, _ = coreml_bundles["e4b"]
    backend = backend_for_verify(bundle)
    ids = np.array([2, 100, 205, 17, 33], np.int64)
    padded = backend.forward(ids)
    assert backend.position == len(ids)
    backend.reset()
    for token in ids:
        one = backend.forward(token[None])
    np.testing.assert_allclose(padded, one, rtol=0, atol=2e-2 * np.abs(one).max())
    assert padded.argmax() == one.argmax()
    # Near the end of the context a padded chunk would not fit: it is fed token by token.
    context = bundle.manifest.max_context
    backend.reset()
    backend._position = context - 3
    assert backend.forward(ids[:3]).shape == (1, bundle.manifest.model.vocab_size)
    with pytest.raises(InputError, match="pass this bundle's context"):
        backend.forward(ids[:1])


# --- bad input ---------------------------------------------------------------------------

def test_running_off_apple_hardware_says_what_to_do_instead(coreml_bundles):
    bundle, _ = coreml_bundles["e2b"]
    result = run_cli("run", str(bundle.path), "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_failure(result, code=69, contains="edgekit verify")


def test_a_recipe_core_ml_cannot_store_is_refused(tiny_e2b, tmp_path):
    result = run_cli("export", str(tiny_e2b), "--device", "iphone-15-pro", "--quant", "8da4w",
                     "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=2, contains="8da4w")
    assert list(tmp_path.iterdir()) == []


def test_an_export_the_plan_says_this_machine_cannot_convert_is_refused_before_loading(tmp_path):
    from edgekit.machine import memory_bytes
    from edgekit.models.gemma4.presets import PRESETS
    from edgekit.testing.checkpoint_writer import build_config

    ckpt = tmp_path / "e4b-config-only"  # a plan reads config.json alone; the export never gets to the weights
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(build_config(PRESETS["e4b-shape"])))
    plan = json.loads(run_cli("plan", str(ckpt), "--device", "mac-m-series", "--json").stdout)
    if memory_bytes() is None or memory_bytes() >= plan["export_memory_bytes"]:
        pytest.skip(f"this machine has the {plan['export_memory_bytes'] / 1e9:.0f} GB the conversion needs")
    result = run_cli("export", str(ckpt), "--device", "mac-m-series", "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=2, contains="more than this machine's")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e4b-config-only"]
