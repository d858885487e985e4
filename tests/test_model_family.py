"""The model-family seam: Gemma 4 is one entry of edgekit.models.FAMILIES, and a second
family (tests/toy_family/, one folder) plans through the same code once it has its line."""

from __future__ import annotations

import json

import pytest

from edgekit import models
from edgekit.errors import CheckpointError
from edgekit.models.gemma4 import FAMILY as GEMMA4
from edgekit.models.gemma4.presets import PRESETS, build_config
from edgekit.plan import make_plan
from edgekit.profiles import load_profiles
from edgekit.registry import Registry
from tests.toy_family import FAMILY as TOY


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setattr(models, "FAMILIES", Registry("model family", (GEMMA4, TOY), error=CheckpointError))


def _toy_checkpoint(tmp_path, **text):
    config = {"model_type": "toy", "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000,
                                                   "num_attention_heads": 4, "max_position_embeddings": 2048, **text}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_an_unknown_model_type_names_the_families_edgekit_reads(tmp_path):
    with pytest.raises(CheckpointError, match="a 'toy' checkpoint, not Gemma 4 \\(model_type must be one of: gemma4\\)"):
        make_plan(_toy_checkpoint(tmp_path), profile=load_profiles().get("pi5-8gb"))


def test_a_second_family_plans_through_the_same_code(tmp_path, with_toy):
    plan = make_plan(_toy_checkpoint(tmp_path), profile=load_profiles().get("pi5-8gb"), recipe_name="fp32")
    assert plan.family is TOY and plan.model == "toy-small"
    assert plan.context_length == 2048  # the model's limit wins over the profile's 8192 default
    assert any("max_position_embeddings" in note for note in plan.notes)
    assert plan.modalities == ("text",)  # the profile's audio and vision: the toy has no towers
    sizes = {c.name: c.size_bytes for c in plan.components}
    # fp32: 4 bytes a weight; the tied lm_head is stored again in the decoder
    assert sizes["token_embedding"] == 4 * 1000 * 64
    assert sizes["text_decoder"] == 4 * (2 * 12 * 64 * 64 + 5 * 64 + 1000 * 64)
    # every layer global with 4 KV heads of 16: K and V of 64 floats (fp32 ONNX cache) per token per layer
    assert plan.kv_cache.bytes_per_token == 2 * 2 * 64 * 4 and plan.kv_cache.global_layers == 2
    with pytest.raises(CheckpointError, match="text_config needs positive"):
        make_plan(_toy_checkpoint(tmp_path, hidden_size=0), profile=load_profiles().get("pi5-8gb"))


def test_gemma4_is_the_registered_family_of_its_presets():
    for name, preset in PRESETS.items():
        config = build_config(preset)
        assert models.family_for_config(config) is GEMMA4
        assert models.get_preset(name) is preset
    assert GEMMA4.size_of(build_config(PRESETS["e2b-shape"])["text_config"]) == "e2b"
    assert GEMMA4.size_of(build_config(PRESETS["tiny-e2b"])["text_config"]) == "custom"


# --- the device side carries only the runtime --------------------------------------------

_RUNTIME_ONLY = r"""
import importlib, pkgutil, sys
import edgekit.runtimes, edgekit.runtimes.backends
for pkg in (edgekit.runtimes, edgekit.runtimes.backends):
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
host = ("edgekit.plan", "edgekit.export", "edgekit.testing", "edgekit.apps", "edgekit.cli", "torch", "transformers")
print(sorted(m for m in sys.modules if m.startswith(host)))
"""


def test_the_runtime_imports_nothing_host_side():
    """Every module of edgekit.runtimes imports: none of the planner, the exporters, the test
    fixtures, the apps, the CLI, torch or transformers comes with it."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", _RUNTIME_ONLY], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_each_format_names_its_exporter_and_runtime():
    from edgekit.errors import NotAvailableError
    from edgekit.formats import FORMATS

    for fmt in FORMATS:
        if fmt.exporter is None:
            with pytest.raises(NotAvailableError, match=fmt.unavailable[:40]):
                fmt.load_exporter()
        else:
            assert fmt.exporter.startswith(f"edgekit.export.{fmt.name}.")  # one folder per format
        if fmt.runtime is not None:
            assert fmt.runtime.startswith("edgekit.runtimes.backends.")
            assert callable(fmt.load_runtime())


# --- config values checked up front ------------------------------------------------------

@pytest.mark.parametrize("edit, key", [
    (lambda t: t.update(hidden_size=0), "text_config.hidden_size must be a positive integer"),
    (lambda t: t.update(num_attention_heads=0), "text_config.num_attention_heads must be a positive integer"),
    (lambda t: t.update(head_dim=-8), "text_config.head_dim must be a positive integer"),
    (lambda t: t.update(num_kv_shared_layers=99), "text_config.num_kv_shared_layers must be an integer from 0"),
    (lambda t: t.update(layer_types=["sliding_attention", "chunked_attention"] * (t["num_hidden_layers"] // 2)),
     "text_config.layer_types"),
    (lambda t: t.update(num_attention_heads=3, num_key_value_heads=2), "must be a multiple of num_key_value_heads"),
    (lambda t: t.update(sliding_window=True), "text_config.sliding_window must be a positive integer"),
])
def test_a_config_the_export_would_die_on_is_refused_by_the_plan(tmp_path, edit, key):
    """Values the pipeline divides by, indexes with or allocates from: `plan` says so, naming
    the key, instead of calling it a fit that `export` then dies on."""
    config = build_config(PRESETS["tiny-e2b"])
    edit(config["text_config"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=key.replace("(", "\\(")):
        make_plan(tmp_path, profile=load_profiles().get("pi5-8gb"))


def test_a_profiles_context_is_a_default_the_models_limit_overrides(tmp_path):
    """tiny-e4b holds 2,048 positions; android-flagship's 8,192 is its default, not a demand."""
    from edgekit.errors import InputError

    config = build_config(PRESETS["tiny-e4b"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    limit = config["text_config"]["max_position_embeddings"]
    plan = make_plan(tmp_path, profile=load_profiles().get("android-flagship"))
    assert plan.context_length == limit < load_profiles().get("android-flagship").max_context
    assert any(f"context {limit}" in note for note in plan.notes)
    with pytest.raises(InputError, match="exceeds the model's max_position_embeddings"):
        make_plan(tmp_path, profile=load_profiles().get("android-flagship"), context=limit + 1)
