"""Export tier: real ONNX bundles from random-weight checkpoints, run by onnxruntime and
verified against transformers (`edgekit verify`), plus every bad input of `edgekit export`.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekit import onnx_layout as L
from edgekit.bundle import load_bundle
from edgekit.errors import ExportError
from edgekit.checkpoint import load
from tests.conftest import assert_clean_failure, run_cli


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_bundle_layout_and_genai_config(onnx_fp32_bundle, tiny_e2b):
    bundle = load_bundle(onnx_fp32_bundle, verify="full")
    manifest = bundle.manifest
    assert manifest.format == "onnx" and manifest.device == "pi5-8gb"
    assert {m.name for m in manifest.methods} == {"token_embedding", "text_decoder", "vision_encoder", "audio_encoder"}
    text = load(tiny_e2b).text_config
    owners = text["num_hidden_layers"] - text["num_kv_shared_layers"]
    decoder = manifest.method("text_decoder")
    past = [t for t in decoder.inputs if t.name.startswith("past_key_values.")]
    # Only cache-owning layers have a cache; global layers carry the larger head dim.
    assert len(past) == 2 * owners
    for t in past:
        layer = int(re.match(r"past_key_values\.(\d+)\.", t.name).group(1))
        global_layer = text["layer_types"][layer] == "full_attention"
        assert t.shape[3] == (text["global_head_dim"] if global_layer else text["head_dim"])
        # sliding layers' past may be shorter (the runner keeps the last window - 1 positions)
        assert t.shape[2] == (L.PAST_SEQUENCE if global_layer else L.SLIDING_PAST_SEQUENCE)
    assert decoder.extra["opset"] >= 17 and decoder.extra["ir_version"] >= 8
    assert decoder.extra["sliding_window"] == text["sliding_window"]
    assert decoder.extra["sliding_cache_layers"] == [
        i for i in range(owners) if text["layer_types"][i] == "sliding_attention"]

    config = json.loads((onnx_fp32_bundle / L.GENAI_CONFIG_FILE).read_text())["model"]
    assert config["type"] == "gemma4"
    assert config["decoder"]["inputs"]["per_layer_inputs"] == L.PER_LAYER_INPUTS
    assert config["embedding"]["outputs"]["per_layer_inputs"] == L.PER_LAYER_INPUTS
    assert config["eos_token_id"] == list(manifest.special_tokens.eos_ids)
    for section in ("decoder", "embedding", "vision", "speech"):
        assert (onnx_fp32_bundle / config[section]["filename"]).is_file()
    assert (onnx_fp32_bundle / config["vision"]["config_filename"]).is_file()


def test_fp32_bundle_verifies_against_transformers(onnx_fp32_bundle, tiny_e2b):
    from edgekit.export.verify import verify_bundle

    report = verify_bundle(onnx_fp32_bundle, load(tiny_e2b), steps=64)
    assert report["passed"], report["failures"]
    decoder = report["methods"]["text_decoder"]
    assert decoder["token_agreement"] == 1.0 and decoder["max_rel_diff"] < 1e-3
    assert report["methods"]["vision_encoder"]["max_abs_diff"] < 1e-4
    assert report["methods"]["audio_encoder"]["max_abs_diff"] < 1e-4
    assert load_bundle(onnx_fp32_bundle).manifest.verification["passed"] is True


def test_runner_keeps_only_the_sliding_window_of_past(onnx_fp32_bundle, tiny_e2b):
    """Sliding layers' past is cut back to the last window - 1 (+ slack) positions; the logits
    are those of the whole history (as onnxruntime-genai feeds it), and going back is refused
    only beyond the rows kept."""
    import numpy as np

    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    def backend(slack: int | None = 4) -> OnnxBackend:
        runner = OnnxBackend(load_bundle(onnx_fp32_bundle))
        if slack is None:
            runner.__dict__["_sliding_past"] = None  # every row kept, as before
        else:
            runner.sliding_slack = slack
        return runner

    window = load(tiny_e2b).text_config["sliding_window"]
    ids = np.random.default_rng(4).integers(10, 1000, 3 * window + 5)
    trimmed, whole = backend(), backend(None)
    sliding, got_window = trimmed._sliding_past
    assert got_window == window and sliding
    held = []
    for chunk in (ids[:window + 2], ids[window + 2:window + 5], *ids[window + 5:, None]):
        np.testing.assert_allclose(trimmed.forward(chunk), whole.forward(chunk), rtol=1e-5, atol=1e-5)
        held.append(max(v.shape[2] for k, v in trimmed._past.items() if k in sliding))
    keep = window - 1 + 4
    assert min(held[2:]) == keep and max(held) <= keep + 4  # cut to keep, once it holds 4 more
    assert all(v.shape[2] == len(ids) for k, v in trimmed._past.items() if k not in sliding)
    assert max(v.shape[2] for v in whole._past.values()) == len(ids)

    # Going back: fine while the window's rows are held, refused beyond; the cache then
    # continues exactly as a fresh one would.
    assert trimmed.truncate(len(ids) + 5) and trimmed.position == len(ids)  # nothing to drop
    back = len(ids) - (held[-1] - (window - 1))
    assert not trimmed.truncate(back - 1) and trimmed.position == len(ids)
    assert trimmed.truncate(back) and trimmed.position == back
    fresh = backend()
    np.testing.assert_allclose(trimmed.forward(ids[back:back + 3]), fresh.forward(ids[:back + 3]),
                               rtol=1e-4, atol=1e-4)


def test_decoder_computes_the_logits_of_the_positions_asked_for(onnx_fp32_bundle):
    """The runner asks for the last position's logits only (logits_to_keep=1); a caller that
    feeds nothing, as onnxruntime-genai does, gets every position's, the same numbers."""
    import numpy as np

    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    ids = np.arange(40, 52)
    last_only = OnnxBackend(load_bundle(onnx_fp32_bundle))
    assert last_only._keeps_last_logits
    every = OnnxBackend(load_bundle(onnx_fp32_bundle))
    every.__dict__["_keeps_last_logits"] = False  # feed nothing: the graph's default
    got, want = last_only.forward(ids), every.forward(ids)
    assert got.shape == (1, want.shape[1]) and want.shape[0] == len(ids)
    np.testing.assert_allclose(got, want[-1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last_only.forward(ids[:1]), every.forward(ids[:1]), rtol=1e-5, atol=1e-5)


def test_runner_keeps_the_sliding_rows_back_to_the_turn_start(onnx_fp32_bundle, tiny_e2b):
    """Once the engine marks where an answer began, decoding past the window keeps the sliding
    rows a truncate back to that point (less the slack) needs; going back there continues as a
    fresh cache would, and the mark ends with it."""
    import numpy as np

    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    runner = OnnxBackend(load_bundle(onnx_fp32_bundle))
    runner.sliding_slack = 4
    sliding, window = runner._sliding_past
    ids = np.random.default_rng(5).integers(10, 1000, 2 * window + 3 * window)
    prompt, answer = ids[:2 * window], ids[2 * window:]
    runner.forward(prompt)
    runner.mark_turn_start(runner.position)
    for token in answer:
        runner.forward(token[None])
    held = max(v.shape[2] for k, v in runner._past.items() if k in sliding)
    assert held == len(ids) - (len(prompt) - 4 - (window - 1))  # the prompt's older rows are cut
    back = len(prompt) - 4
    assert not runner.truncate(back - 1) and runner.truncate(back)
    fresh = OnnxBackend(load_bundle(onnx_fp32_bundle))
    np.testing.assert_allclose(runner.forward(ids[back:back + 3]), fresh.forward(ids[:back + 3]),
                               rtol=1e-4, atol=1e-4)
    for token in ids[back + 3:]:  # no turn open: cut back to window - 1 + slack again
        runner.forward(token[None])
    assert max(v.shape[2] for k, v in runner._past.items() if k in sliding) <= window - 1 + 2 * 4


def test_decoder_runs_fused_norms_and_no_cache_copies(onnx_fp32_bundle, tmp_path):
    """What onnxruntime runs per decode step: each weighted RMSNorm one fused kernel
    (export/onnx/fusable_norms.py), and grouped-query attention without an Expand of the cache."""
    import onnxruntime as ort

    raw = _ops(onnx_fp32_bundle / "decoder.onnx")
    assert "Expand" not in raw
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(onnx_fp32_bundle / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    # per layer: input, post-attention, pre- and post-feedforward, q, k, per-layer-input norms; + final
    assert optimized.count("SimplifiedLayerNormalization") >= 7
    # left unfused: only v_norm (no weight) squares its input
    assert optimized.count("Pow") <= _pow_budget(onnx_fp32_bundle)


def _pow_budget(bundle: Path) -> int:
    """Pow nodes a decoder may keep after fusion: v_norm's two per cache-owning layer."""
    owners = sum(1 for t in load_bundle(bundle).manifest.method("text_decoder").inputs
                 if t.name.startswith("past_key_values.") and t.name.endswith(".key"))
    return 2 * owners


def test_int4_bundle_is_quantized_smaller_and_within_bounds(onnx_int4_bundle, onnx_fp32_bundle, tiny_e4b):
    """The pi5-8gb profile's own recipe (int4-b128: int4, one scale per 128 weights)."""
    from edgekit.profiles import load_profiles

    manifest = load_bundle(onnx_int4_bundle).manifest
    assert manifest.recipe == load_profiles().get("pi5-8gb").recipe == "int4-b128"
    assert "MatMulNBits" in _ops(onnx_int4_bundle / "decoder.onnx")
    assert "GatherBlockQuantized" in _ops(onnx_int4_bundle / "embedding.onnx")
    # the towers' linears int8 weight-only, as the recipe says (not dynamic int8 MatMulInteger)
    for tower in ("vision_encoder", "audio_encoder"):
        assert _matmul_bits(onnx_int4_bundle / L.GRAPH_FILES[tower]) == {8}
        assert manifest.quant_schemes[tower] == "int8-b128"
    # every file the bundle holds takes one mode, whichever tool wrote it
    modes = {f.name: f.stat().st_mode & 0o777 for f in onnx_int4_bundle.iterdir()}
    assert len(set(modes.values())) == 1 and modes["manifest.json"] & 0o444 == 0o444, modes
    result = run_cli("verify", str(onnx_int4_bundle), "--reference", str(tiny_e4b), "--steps", "32", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # Measured on tiny-e4b, 32 steps: logits cosine 0.94 (bounds in export/verify.py).
    assert report["methods"]["text_decoder"]["min_cosine"] >= 0.90
    assert report["methods"]["text_decoder"]["token_agreement"] >= 0.75


def _matmul_bits(path: Path) -> set[int]:
    """The bits of a graph's MatMulNBits nodes; MatMulInteger (dynamic int8) counts as 0."""
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {({a.name: a.i for a in n.attribute}["bits"] if n.op_type == "MatMulNBits" else 0)
            for n in nodes if n.op_type in ("MatMulNBits", "MatMulInteger")}


def test_int8_bundle_stores_every_linear_and_table_in_one_byte_and_verifies(plan_size_bundle, plan_size_checkpoint):
    """The int8 recipe as it says: every decoder linear and the tied lm_head MatMulNBits bits=8
    (block 128, int8 compute: accuracy_level 4, without which it ran ~100x slower), both
    tables GatherBlockQuantized bits=8: one byte per weight of each; the manifest names
    each graph's scheme, and verify passes the int8 bound. The bundle is the plan-size export
    of the int8 recipe (tests/plan_sizes.py: every width a multiple of the block)."""
    from edgekit.export.verify import verify_bundle
    from edgekit.models.family import PER_LAYER_EMBEDDING
    from edgekit.models.gemma4.param_count import count_parameters
    from tests.plan_sizes import Case

    bundle = plan_size_bundle(Case("onnx", "cpu", "int8"))
    checkpoint = load(plan_size_checkpoint)
    counts = count_parameters(checkpoint.config)
    text = checkpoint.text_config
    expected = {"text_decoder": counts["text_decoder"].linear + text["vocab_size"] * text["hidden_size"],
                "token_embedding": counts["token_embedding"].embedding + counts[PER_LAYER_EMBEDDING].embedding}
    for method, weights in expected.items():
        graph = onnx.load(str(bundle.file(L.GRAPH_FILES[method])), load_external_data=False).graph
        stored = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8}
        assert sum(np.prod(t.dims) for t in stored.values()) == weights, method
        weight_input = {"MatMulNBits": 1, "GatherBlockQuantized": 0}
        nodes = [n for n in graph.node if n.op_type in weight_input]
        assert {n.input[weight_input[n.op_type]] for n in nodes} == set(stored), method
        for n in nodes:
            attrs = {a.name: a.i for a in n.attribute}
            assert (attrs["bits"], attrs["block_size"]) == (8, 128), n.name
            assert n.op_type != "MatMulNBits" or attrs["accuracy_level"] == 4, n.name
    assert "MatMulInteger" not in _ops(bundle.file(L.GRAPH_FILES["text_decoder"]))
    assert bundle.manifest.quant_schemes == {"token_embedding": "int8-emb-b128", "text_decoder": "int8-b128"}
    assert bundle.manifest.recipe == "int8"
    report = verify_bundle(bundle.path, checkpoint, steps=16, save=False)
    assert report["bounds"]["min_cosine"] == 0.998
    assert report["passed"], (report["failures"], report["methods"]["text_decoder"])


def test_size_first_recipe_stores_the_per_layer_rows_in_two_bits(tiny_e2b_4layers, tmp_path):
    """int4-ple2: the per-layer table through GatherBlockQuantized bits=2, the token table
    in 4 bits, and the bundle still within its bounds against transformers. The 4-layer
    tiny-e2b has both tables 64 wide: their traced stand-ins must stay two initializers."""
    from edgekit.export.onnx.exporter import export_onnx
    from edgekit.export.verify import verify_bundle
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    plan = make_plan(tiny_e2b_4layers, profile=load_profiles().get("pi5-8gb"), recipe_name="int4-ple2",
                     modalities="text")
    bundle = export_onnx(load(tiny_e2b_4layers), plan=plan, output=tmp_path / "ple2.edgekit")
    graph = onnx.load(str(bundle.file(L.GRAPH_FILES["token_embedding"])), load_external_data=False).graph
    bits = {n.input[0]: {a.name: a.i for a in n.attribute}.get("bits", 4)
            for n in graph.node if n.op_type == "GatherBlockQuantized"}
    assert sorted(bits.values()) == [2, 4], bits
    assert any("per_layer" in name for name, b in bits.items() if b == 2), bits
    assert bundle.manifest.quant_schemes["token_embedding"] == "int4-emb-b32+int2-emb-g64"
    report = verify_bundle(bundle.path, load(tiny_e2b_4layers), steps=16)
    # Its own, looser bounds (export/verify.py): measured min logits cosine 0.983 here (tiny-e4b
    # with every tower: 0.885).
    assert report["bounds"]["min_cosine"] == 0.85
    assert report["passed"], (report["failures"], report["methods"]["text_decoder"])


def test_lm_head_takes_its_own_block_size(tiny_e2b_4layers, tmp_path):
    """int4-head128: decoder linears in blocks of 32, the lm_head (half of a 4-layer E2B's
    decode time) in blocks of 128; the manifest names both, and the bundle verifies."""
    from edgekit.export.onnx.exporter import export_onnx
    from edgekit.export.verify import verify_bundle
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    checkpoint = load(tiny_e2b_4layers)
    plan = make_plan(tiny_e2b_4layers, profile=load_profiles().get("pi5-8gb"), recipe_name="int4-head128",
                     modalities="text")
    bundle = export_onnx(checkpoint, plan=plan, output=tmp_path / "head128.edgekit")
    graph = onnx.load(str(bundle.file(L.GRAPH_FILES["text_decoder"])), load_external_data=False).graph
    blocks = {}
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            blocks.setdefault(attrs["N"] == checkpoint.text_config["vocab_size"], set()).add(attrs["block_size"])
    assert blocks == {True: {128}, False: {32}}, blocks
    assert bundle.manifest.quant_schemes["text_decoder"] == "int4-b32+int4-b128"
    report = verify_bundle(bundle.path, checkpoint, steps=16)
    assert report["passed"], (report["failures"], report["methods"]["text_decoder"])


def test_any_gemma4_config_exports_not_only_presets(tmp_path):
    """Other widths, layer pattern and shared-KV count than any preset: still exact in fp32."""
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.export.onnx.exporter import export_onnx
    from edgekit.export.verify import verify_bundle
    from edgekit.plan import make_plan
    from edgekit.models.gemma4.presets import PRESETS, Preset, TextShape
    from edgekit.profiles import load_profiles

    tiny = PRESETS["tiny-e2b"]
    shape = TextShape(hidden_size=48, intermediate_size=96, num_hidden_layers=7, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=24, global_head_dim=48, hidden_size_per_layer_input=8,
                      num_kv_shared_layers=2, sliding_every=3, sliding_window=8, use_double_wide_mlp=True,
                      vocab_size=4096, max_position_embeddings=4096)
    custom = Preset("custom", "test", shape, tiny.audio, tiny.vision)
    checkpoint = make_checkpoint(custom, tmp_path / "custom", seed=3, audio=False, vision=False)
    plan = make_plan(checkpoint, profile=load_profiles().get("pi5-8gb"), recipe_name="fp32", modalities="text")
    bundle = export_onnx(load(checkpoint), plan=plan, output=tmp_path / "custom.edgekit")
    report = verify_bundle(bundle.path, load(checkpoint), steps=24)
    assert report["passed"], report["failures"]
    assert report["methods"]["text_decoder"]["token_agreement"] == 1.0


# --- bad input ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory) -> Path:
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.models.gemma4.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ck") / "no-towers", layers=3,
                           audio=False, vision=False)


def test_missing_modality_is_a_clear_error(text_only_checkpoint, tmp_path):
    result = run_cli("export", str(text_only_checkpoint), "--device", "pi5-8gb", "--modalities", "text,audio",
                     "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=2, contains="audio")
    assert not (tmp_path / "b.edgekit").exists()


def test_unsupported_recipe_lists_the_supported_ones(text_only_checkpoint, tmp_path):
    result = run_cli("export", str(text_only_checkpoint), "--device", "pi5-8gb", "--quant", "8da4w",
                     "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=2, contains="int4")
    assert not (tmp_path / "b.edgekit").exists()


def test_not_gemma4_checkpoint(text_only_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "llama"
    shutil.copytree(text_only_checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llama"
    (copy / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run_cli("export", str(copy), "--device", "pi5-8gb", "-o", str(tmp_path / "b.edgekit")),
                         code=3, contains="not Gemma 4")


def _plan(checkpoint: Path):
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    return make_plan(checkpoint, profile=load_profiles().get("pi5-8gb"), recipe_name="fp32", modalities="text")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_or_disk_full_export_leaves_nothing(text_only_checkpoint, tmp_path, monkeypatch, failure):
    from edgekit.export.onnx import exporter

    calls = []

    def fail_on_second_graph(spec, path, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:
            raise failure
        return real(spec, path, **kwargs)

    real = exporter.export_graph
    monkeypatch.setattr(exporter, "export_graph", fail_on_second_graph)
    out = tmp_path / "out"
    out.mkdir()
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else ExportError
    with pytest.raises(expected) as info:
        exporter.export_onnx(load(text_only_checkpoint), plan=_plan(text_only_checkpoint),
                             output=out / "b.edgekit")
    if expected is ExportError:
        assert "disk full" in str(info.value)
    assert _leftovers(out) == []  # no bundle, no temporary or scratch directory


def test_verify_against_another_model_is_an_input_error(onnx_fp32_bundle, tiny_e4b):
    """A reference of another shape is a wrong argument, not a failed bundle: exit 2, and no
    failing report saved into the bundle."""
    before = (onnx_fp32_bundle / "manifest.json").read_bytes()
    result = run_cli("verify", str(onnx_fp32_bundle), "--reference", str(tiny_e4b), "--steps", "2")
    assert_clean_failure(result, code=2, contains="is not the model")
    assert (onnx_fp32_bundle / "manifest.json").read_bytes() == before


def test_verify_on_a_read_only_bundle_says_so_before_any_work(onnx_fp32_bundle, tiny_e2b, tmp_path):
    """verify saves its report in the bundle: on a read-only file system that is a one-line
    input error before both models load (it failed after minutes), and --no-save is the way out."""
    import subprocess
    import time

    view = tmp_path / "read-only"
    view.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(onnx_fp32_bundle), str(view)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount here (a read-only view needs root): {exc}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        started = time.monotonic()
        result = run_cli("verify", str(view), "--reference", str(tiny_e2b), "--steps", "2")
        assert_clean_failure(result, code=2, contains="is read-only, and verify saves its report")
        assert "--no-save" in result.stderr and time.monotonic() - started < 60
    finally:
        subprocess.run(["umount", str(view)], check=False, capture_output=True)


def test_existing_bundle_is_not_overwritten_without_flag(onnx_fp32_bundle, tiny_e2b):
    before = (onnx_fp32_bundle / "manifest.json").read_bytes()
    result = run_cli("export", str(tiny_e2b), "--device", "pi5-8gb", "-o", str(onnx_fp32_bundle))
    assert_clean_failure(result, code=2, contains="already exists (pass --overwrite to replace it)")
    assert (onnx_fp32_bundle / "manifest.json").read_bytes() == before


def test_missing_execution_provider_falls_back_with_a_warning(onnx_fp32_bundle, capsys):
    import numpy as np

    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    backend = OnnxBackend(load_bundle(onnx_fp32_bundle),
                          providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    logits = backend.forward(np.array([2, 10, 11], np.int64))
    assert logits.shape[0] == 1  # the last position's
    warning = capsys.readouterr().err
    assert "CUDAExecutionProvider" in warning and "CPUExecutionProvider" in warning


def test_runner_sessions_keep_no_cpu_arena(onnx_fp32_bundle, monkeypatch):
    """The arena would keep a prefill's [S, vocab] buffers for the whole session; without it
    the logits are the same (bench/RESULTS.md section 9 has the memory)."""
    import numpy as np

    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    def prefill_then_decode(backend):
        prefill = backend.forward(np.array([2, 10, 11, 12], np.int64))
        return prefill, backend.forward(np.array([int(prefill[-1].argmax())], np.int64))

    runner = OnnxBackend(load_bundle(onnx_fp32_bundle))
    without = prefill_then_decode(runner)
    assert runner._sessions and all(not s.get_session_options().enable_cpu_mem_arena for s in runner._sessions.values())
    monkeypatch.setattr(OnnxBackend, "memory_arena", True)
    with_arena = OnnxBackend(load_bundle(onnx_fp32_bundle))
    expected = prefill_then_decode(with_arena)
    assert all(s.get_session_options().enable_cpu_mem_arena for s in with_arena._sessions.values())
    for got, want in zip(without, expected):
        np.testing.assert_array_equal(got, want)


def test_runner_gives_back_the_weight_pages_prepacking_copied(onnx_int4_bundle, monkeypatch):
    """onnxruntime maps decoder.onnx.data and MatMulNBits copies what it reads into its
    prepacked buffers; the runner drops the mapped pages left resident, and decodes the same."""
    import numpy as np

    from edgekit.runtimes.backends import onnx_backend
    from edgekit.runtimes.backends.onnx_backend import OnnxBackend
    from edgekit.runtimes.mapped_pages import file_mappings

    data = onnx_int4_bundle / "decoder.onnx.data"

    def decoder_resident_bytes_and_logits():
        backend = OnnxBackend(load_bundle(onnx_int4_bundle))
        backend._session("text_decoder")
        mappings = file_mappings(data)
        assert mappings, "onnxruntime no longer maps the external data"
        resident = sum(m.resident_bytes for m in mappings)
        prefill = backend.forward(np.array([2, 10, 11, 12], np.int64))
        return resident, prefill, backend.forward(np.array([int(prefill[-1].argmax())], np.int64))

    released = decoder_resident_bytes_and_logits()
    monkeypatch.setattr(onnx_backend, "release_file_pages", lambda path: 0)
    kept = decoder_resident_bytes_and_logits()
    assert released[0] == 0 < kept[0]
    for got, want in zip(released[1:], kept[1:]):
        np.testing.assert_array_equal(got, want)


def test_export_refuses_what_does_not_fit(tmp_path):
    """Checked from config.json alone, before any weight is read (there are none here)."""
    from edgekit.models.gemma4.presets import PRESETS, build_config

    checkpoint = tmp_path / "e2b"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(build_config(PRESETS["e2b-shape"])))
    result = run_cli("export", str(checkpoint), "--device", "pi4-4gb", "--quant", "fp32",
                     "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=5, contains="--force")
    assert not (tmp_path / "b.edgekit").exists()


def test_an_export_shows_each_stage_when_stderr_is_not_a_terminal(onnx_int4_bundle):
    """The CLI export behind onnx_int4_bundle ran with stderr to a pipe: one line per stage,
    with the time elapsed, so a long export is never silent in a log."""
    import re

    from edgekit.progress import STAGE_PREFIX

    lines = (onnx_int4_bundle.parent / "export.stderr").read_text().splitlines()
    assert lines and all(line.startswith(STAGE_PREFIX) for line in lines), lines
    stages = [re.sub(r"^edgekit: \[ *[\d.]+ s\] ", "", line) for line in lines]
    assert stages[:2] == ["Loading the checkpoint", "Loading the checkpoint: done"]
    for method in ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder"):
        assert stages.index(f"Tracing {method}") < stages.index(f"Quantizing {method}")
    assert stages[-1] == "Exporting ONNX graphs: done"
