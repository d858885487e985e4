"""Plan tier checked against reality: `edgekit plan` sizes within 10% of the files an
export really writes (fp32 and int4), on a checkpoint wide enough that weights dominate.
"""

from __future__ import annotations

import pytest

from edgekit.checkpoint import load


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.models.gemma4.presets import PRESETS, Preset, TextShape

    shape = TextShape(hidden_size=256, intermediate_size=512, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=64, global_head_dim=128, hidden_size_per_layer_input=64,
                      num_kv_shared_layers=2, sliding_every=5, sliding_window=64, use_double_wide_mlp=True,
                      vocab_size=32768, max_position_embeddings=4096)
    tiny = PRESETS["tiny-e2b"]
    preset = Preset("wide", "plan accuracy", shape, tiny.audio, tiny.vision)
    return make_checkpoint(preset, tmp_path_factory.mktemp("ck") / "wide", audio=False, vision=False)


@pytest.mark.parametrize("recipe", ["fp32", "int4"])
def test_plan_bundle_size_within_ten_percent(wide_checkpoint, tmp_path, recipe):
    from edgekit.export.onnx.exporter import export_onnx
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    plan = make_plan(wide_checkpoint, profile=load_profiles().get("pi5-8gb"), recipe_name=recipe,
                     modalities="text")
    bundle = export_onnx(load(wide_checkpoint), plan=plan, output=tmp_path / f"{recipe}.edgekit")
    weights = sum(f.size for f in bundle.manifest.files if f.path.endswith((".onnx", ".onnx.data")))
    assert abs(plan.bundle_size_bytes - weights) / weights < 0.10, (plan.bundle_size_bytes, weights)
