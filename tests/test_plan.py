"""CPU unit tests: analytic parameter counts and ExportPlan, from config.json alone.

Structure tests from preset configs written to tmp_path (no weights). The parameter
counts are checked exactly against transformers' Gemma4ForConditionalGeneration built
on the meta device; the CLI runs in subprocesses.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from edgekit.errors import CheckpointError, DeviceProfileError, DoesNotFitError, InputError
from edgekit.compute_shapes import PREFILL_CHUNK, vision_query_chunk
from edgekit.models.family import PER_LAYER_EMBEDDING
from edgekit.models.gemma4.param_count import count_parameters, text_layers, total_parameters
from edgekit.plan import kv_cache, make_plan
from edgekit.models.gemma4.presets import PRESETS, build_config
from edgekit.profiles import load_profiles
from tests.conftest import assert_clean_failure, run_cli

PROFILES = load_profiles()


def _checkpoint(tmp_path: Path, preset: str = "e2b-shape", *, layers: int | None = None, edit=None) -> Path:
    config = build_config(PRESETS[preset], layers=layers)
    if edit:
        edit(config)
    path = tmp_path / f"{preset}-{layers or 'full'}"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


# --- parameter counts --------------------------------------------------------------------


def _meta_count(config: dict) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma4Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


def _edited(preset: str, edit) -> dict:
    config = copy.deepcopy(build_config(PRESETS[preset]))
    edit(config)
    return config


def _widths(c: dict) -> None:
    c["text_config"].update(hidden_size=96, intermediate_size=200, head_dim=24, global_head_dim=40,
                            hidden_size_per_layer_input=8, num_attention_heads=2)
    c["vision_config"].update(hidden_size=48, head_dim=12, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=100, patch_size=8)
    c["audio_config"].update(hidden_size=40, num_attention_heads=5, conv_kernel_size=3, output_proj_dims=56,
                             subsampling_conv_channels=[64, 8])


CONFIGS = {
    **{f"{name}-L{layers or 'full'}": build_config(PRESETS[name], layers=layers)
       for name in PRESETS for layers in (None, 4)},
    "no-kv-sharing": _edited("tiny-e2b", lambda c: c["text_config"].update(num_kv_shared_layers=0)),
    "no-towers": _edited("tiny-e2b", lambda c: c.update(audio_config=None, vision_config=None)),
    "untied": _edited("tiny-e4b", lambda c: c.update(tie_word_embeddings=False)),
    "tied-by-default": _edited("tiny-e4b", lambda c: (c.pop("tie_word_embeddings"),
                                                      c["text_config"].update(tie_word_embeddings=False))),
    "other-widths": _edited("tiny-e2b", _widths),
    "k-eq-v": _edited("tiny-e2b", lambda c: c["text_config"].update(attention_k_eq_v=True,
                                                                     num_global_key_value_heads=2)),
    "attention-bias": _edited("tiny-e4b", lambda c: c["text_config"].update(attention_bias=True)),
    "e2b-7-layers": build_config(PRESETS["e2b-shape"], layers=7),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_param_count_matches_transformers_exactly(name):
    config = CONFIGS[name]
    assert total_parameters(config) == _meta_count(config)


def test_saved_per_layer_config_is_honoured():
    # transformers' save_pretrained writes per_layer_config instead of global_head_dim.
    config = copy.deepcopy(CONFIGS["tiny-e2b-Lfull"])
    text = config["text_config"]
    gh = text.pop("global_head_dim")
    text["per_layer_config"] = {str(i): {"head_dim": gh} for i, t in enumerate(text["layer_types"])
                                if t == "full_attention"}
    assert total_parameters(config) == total_parameters(CONFIGS["tiny-e2b-Lfull"])


def test_e2b_and_e4b_sizes():
    e2b = count_parameters(build_config(PRESETS["e2b-shape"]))
    assert sum(p.total for p in e2b.values()) / 1e9 == pytest.approx(5.10, abs=0.01)
    assert e2b[PER_LAYER_EMBEDDING].total == 262_144 * 35 * 256  # ~2.35 B
    assert e2b["token_embedding"].total / 1e9 == pytest.approx(0.40, abs=0.01)
    assert e2b["audio_encoder"].total / 1e9 == pytest.approx(0.30, abs=0.01)
    assert e2b["vision_encoder"].total / 1e9 == pytest.approx(0.17, abs=0.01)
    assert total_parameters(build_config(PRESETS["e4b-shape"])) / 1e9 == pytest.approx(7.94, abs=0.01)


def test_towers_absent_from_config_are_not_counted():
    counts = count_parameters(CONFIGS["no-towers"])
    assert set(counts) == {"token_embedding", PER_LAYER_EMBEDDING, "text_decoder"}


# --- KV cache ----------------------------------------------------------------------------


def _kv(text, **kwargs):
    return kv_cache(text_layers(text), sliding_window=text["sliding_window"], **kwargs)


def test_kv_cache_e2b():
    text = build_config(PRESETS["e2b-shape"])["text_config"]
    kv = _kv(text, context_length=4096, dtype_bits=16)
    assert (kv.sliding_layers, kv.global_layers, kv.shared_layers) == (12, 3, 20)
    # 12 x (1 head x 256 x K,V x 2 B) + 3 x (1 x 512 x 2 x 2 B): ~18 KB
    assert kv.bytes_per_token == 18_432 and kv.bytes_per_token_past_window == 6_144
    assert kv.total_bytes == 12 * 1024 * 512 + 3 * 2048 * 4096
    # Within the window every cache-owning layer grows.
    assert _kv(text, context_length=256, dtype_bits=16).total_bytes == 18_432 * 256
    assert _kv(text, context_length=4096, dtype_bits=32).total_bytes == 2 * kv.total_bytes


def test_kv_cache_e4b_and_without_sharing():
    text = build_config(PRESETS["e4b-shape"])["text_config"]
    kv = _kv(text, context_length=512, dtype_bits=16)
    assert (kv.sliding_layers, kv.global_layers, kv.shared_layers) == (20, 4, 18)
    assert kv.bytes_per_token == 57_344  # ~56 KB
    text["num_kv_shared_layers"] = 0
    assert _kv(text, context_length=512, dtype_bits=16).shared_layers == 0


# --- plans -------------------------------------------------------------------------------


def test_e2b_fp32_does_not_fit_pi4(tmp_path):
    plan = make_plan(_checkpoint(tmp_path), profile=PROFILES.get("pi4-4gb"), recipe_name="fp32")
    assert not plan.fits
    with pytest.raises(DoesNotFitError, match=r"needs [\d.]+ GB but pi4-4gb allows [\d.]+ GB; .*--force"):
        plan.check_fits(force=False)
    plan.check_fits(force=True)


@pytest.mark.parametrize("format_name, recipe", [(None, None), ("onnx", "int4"), ("executorch", "8da4w")])
def test_e2b_quantized_fits_pi5(tmp_path, format_name, recipe):
    plan = make_plan(_checkpoint(tmp_path), profile=PROFILES.get("pi5-8gb"), format_name=format_name,
                     recipe_name=recipe)
    assert plan.fits, plan.memory
    plan.check_fits(force=False)
    assert plan.format.name == (format_name or "onnx")


def test_size_first_recipe_puts_e2b_under_2_5_gb(tmp_path):
    """8da4w-ple2 (2-bit per-layer rows) is the ExecuTorch recipe that fits E2B with every tower
    in 2.5 GB; the profile's 4-bit one does not (full-depth files: bench/RESULTS.md)."""
    ckpt = _checkpoint(tmp_path)
    small = make_plan(ckpt, profile=PROFILES.get("android-flagship"), recipe_name="8da4w-ple2")
    default = make_plan(ckpt, profile=PROFILES.get("android-flagship"))
    assert small.modalities == default.modalities == ("text", "audio", "vision")
    assert small.bundle_size_bytes < 2.5e9 < default.bundle_size_bytes
    by_name = {c.name: c for c in small.components}
    assert by_name[PER_LAYER_EMBEDDING].bits_per_weight == 2 + 16 / 64


def test_plan_memory_breakdown(tmp_path):
    plan = make_plan(_checkpoint(tmp_path), profile=PROFILES.get("pi5-8gb"))
    by_name = {c.name: c for c in plan.components}
    ple = by_name[PER_LAYER_EMBEDDING]
    assert ple.memory_mapped and plan.memory.mapped_weights_bytes == ple.size_bytes
    assert plan.memory.resident_weights_bytes == plan.bundle_size_bytes - ple.size_bytes
    assert ple.bits_per_weight == pytest.approx(4.125)  # int4-b128: int4 + one fp16 scale per 128
    # The tied lm_head is stored again in the decoder: 262144 x 1536 more weights.
    dec = by_name["text_decoder"]
    assert dec.stored_parameters - dec.parameters == 262_144 * 1536
    m = plan.memory
    assert m.total_bytes == m.resident_weights_bytes + m.kv_cache_bytes + m.activations_bytes
    assert m.budget_bytes == int(8 * 1024**3 * 0.7)
    # ONNX keeps the cache in fp32 graph inputs whatever the recipe: 2 KiB / 4 KiB rows.
    assert plan.kv_cache.dtype_bits == 32
    assert plan.kv_cache.total_bytes == 12 * 2048 * 512 + 3 * 4096 * 4096


def test_executorch_plan_counts_the_ring_buffers(tmp_path):
    """The .pte's sliding layers hold window + chunk - 1 slots, in fp32."""
    plan = make_plan(_checkpoint(tmp_path), profile=PROFILES.get("android-midrange"))
    assert plan.format.name == "executorch" and plan.kv_cache.dtype_bits == 32
    context = plan.context_length
    assert plan.kv_cache.total_bytes == 12 * 2048 * (512 + PREFILL_CHUNK - 1) + 3 * 4096 * context


def test_every_profile_fits_its_recommended_model(tmp_path):
    paths = {"e2b": _checkpoint(tmp_path, "e2b-shape"), "e4b": _checkpoint(tmp_path, "e4b-shape")}
    for profile in PROFILES:
        plan = make_plan(paths[profile.model], profile=profile)
        assert plan.fits, (profile.name, plan.memory)
        assert plan.recipe.name == profile.recipe and plan.modalities == profile.modalities


def test_overrides(tmp_path):
    ckpt = _checkpoint(tmp_path)
    profile = PROFILES.get("jetson-orin-nano-8gb")
    plan = make_plan(ckpt, profile=profile, modalities="text,audio", context=1024)
    assert plan.modalities == ("text", "audio") and plan.context_length == 1024
    assert "vision_encoder" not in {c.name for c in plan.components}
    assert plan.execution_providers == profile.execution_providers
    # Another format than the profile's: its default recipe and first backend.
    other = make_plan(ckpt, profile=profile, format_name="executorch")
    assert (other.recipe.name, other.backend, other.execution_providers) == ("8da4w-emb4", "xnnpack", ())


@pytest.mark.parametrize("kwargs, message", [
    ({"recipe_name": "8da4w"}, "recipe '8da4w' is not supported by format 'onnx'"),
    ({"recipe_name": "int3"}, "unknown quantization recipe 'int3'"),
    ({"format_name": "tflite"}, "unknown format 'tflite'"),
    ({"modalities": "text,smell"}, "unknown modality 'smell'"),
    ({"modalities": "audio"}, "must include text"),
    ({"context": 0}, "context must be a positive integer"),
    ({"context": 10**6}, "exceeds the model's max_position_embeddings"),
])
def test_bad_overrides_are_input_errors(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        make_plan(_checkpoint(tmp_path), profile=PROFILES.get("pi5-8gb"), **kwargs)


def test_checkpoint_without_towers(tmp_path):
    ckpt = _checkpoint(tmp_path, "tiny-e2b", edit=lambda c: c.update(audio_config=None, vision_config=None))
    plan = make_plan(ckpt, profile=PROFILES.get("pi5-8gb"))
    assert plan.modalities == ("text",) and any("no audio tower" in n for n in plan.notes)
    with pytest.raises(InputError, match="no audio tower"):
        make_plan(ckpt, profile=PROFILES.get("pi5-8gb"), modalities="text,audio")


def test_bidirectional_image_attention_is_left_out_or_refused(tmp_path):
    """Configs whose decoder attends both ways over image tokens (Gemma 4's larger models):
    vision is left out by default with a note, refused when asked for; a wholly
    bidirectional decoder is refused."""
    def bidirectional(mode):
        (tmp_path / mode).mkdir()
        return _checkpoint(tmp_path / mode, "tiny-e2b",
                           edit=lambda c: c["text_config"].update(use_bidirectional_attention=mode))

    ckpt = bidirectional("vision")
    plan = make_plan(ckpt, profile=PROFILES.get("pi5-8gb"))
    assert "vision" not in plan.modalities and "audio" in plan.modalities
    assert any("both ways over image tokens" in n for n in plan.notes)
    with pytest.raises(InputError, match="cannot export vision"):
        make_plan(ckpt, profile=PROFILES.get("pi5-8gb"), modalities="text,vision")
    with pytest.raises(CheckpointError, match="bidirectional"):
        make_plan(bidirectional("all"), profile=PROFILES.get("pi5-8gb"))


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "has no config.json"),
    (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llama"})), "not Gemma 4"),
])
def test_bad_checkpoint_is_a_checkpoint_error(tmp_path, setup, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    setup(ckpt)
    with pytest.raises(CheckpointError, match=message):
        make_plan(ckpt, profile=PROFILES.get("pi5-8gb"))


# --- CLI ---------------------------------------------------------------------------------


def test_cli_plan_json(tmp_path):
    result = run_cli("plan", str(_checkpoint(tmp_path)), "--device", "pi5-8gb", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {"format", "backend", "recipe", "context_length", "modalities", "components", "bundle_size_bytes",
            "kv_cache", "memory", "fits"} <= set(plan)
    assert plan["fits"] is True and plan["checkpoint_parameters"] == 5_104_297_504
    assert {"resident_weights_bytes", "mapped_weights_bytes", "kv_cache_bytes", "activations_bytes",
            "total_bytes", "budget_bytes"} <= set(plan["memory"])


def test_cli_plan_that_does_not_fit_still_exits_zero(tmp_path):
    result = run_cli("plan", str(_checkpoint(tmp_path)), "--device", "pi4-4gb", "--quant", "fp32", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "does NOT fit on pi4-4gb" in result.stdout


def test_vision_query_chunk_keeps_one_block_of_scores_near_its_budget():
    assert vision_query_chunk(12, 5040) == 512  # E2B's tower at a 560-token budget: 118 MiB of scores
    assert vision_query_chunk(12, 630) == 630  # small images: one block
    assert vision_query_chunk(16, 100_000) == 64  # never below 64 rows


def test_executorch_plans_vision_attention_one_block_of_queries_at_a_time(tmp_path):
    """android-flagship (560 soft tokens = 5040 patches): the ONNX graph's whole score matrix
    is 1.2 GB; ExecuTorch's chunked block a tenth of that, so the decoder's prefill (0.33 GB
    at 8192 tokens of context) is the peak stage again."""
    ckpt, profile = _checkpoint(tmp_path), PROFILES.get("android-flagship")
    chunked = make_plan(ckpt, profile=profile, format_name="executorch", modalities="text,vision")
    whole = make_plan(ckpt, profile=profile, format_name="onnx", recipe_name="int4", modalities="text,vision")
    scores = 12 * 5040 * 5040 * 4
    assert whole.memory.activations_bytes > scores > chunked.memory.activations_bytes
    assert chunked.memory.activations_bytes < scores / 3


def test_cli_plan_unknown_device_fails_cleanly(tmp_path):
    result = run_cli("plan", str(_checkpoint(tmp_path)), "--device", "pi3", timeout=60)
    assert_clean_failure(result, code=DeviceProfileError.exit_code, contains="unknown device 'pi3'")


def test_cli_plan_missing_checkpoint_fails_cleanly(tmp_path):
    result = run_cli("plan", str(tmp_path / "nope"), "--device", "pi5-8gb", timeout=60)
    assert_clean_failure(result, code=CheckpointError.exit_code, contains="does not exist")



def test_cli_export_external_weights_is_for_executorch_only(tmp_path):
    out = tmp_path / "b.edgekit"
    result = run_cli("export", str(_checkpoint(tmp_path)), "--device", "pi5-8gb", "--external-weights",
                     "-o", str(out), timeout=60)
    assert_clean_failure(result, code=InputError.exit_code, contains="--external-weights is for executorch bundles")
    assert not out.exists()
