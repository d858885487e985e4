"""Checkpoint tier: random-weight checkpoints are written like real ones, load through
transformers, and every broken checkpoint is a one-line CheckpointError.

Uses the session's tiny checkpoints (real files, real safetensors, real transformers load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgekit.errors import CheckpointError, InputError
from edgekit.checkpoint import load, read_config
from edgekit.models.gemma4.presets import PRESETS, build_config
from tests.conftest import assert_clean_failure, run_cli

RELEASED_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "processor_config.json"}


@pytest.mark.parametrize("fixture", ["tiny_e2b", "tiny_e4b"])
def test_tiny_checkpoint_has_released_files_and_loads_in_transformers(fixture, request):
    import torch

    path: Path = request.getfixturevalue(fixture)
    names = {p.name for p in path.iterdir()}
    assert RELEASED_FILES <= names
    assert "model.safetensors" in names

    checkpoint = load(path)
    text = checkpoint.text_config
    assert checkpoint.has_audio and checkpoint.has_vision
    assert text["num_kv_shared_layers"] > 0
    assert "full_attention" in text["layer_types"] and "sliding_attention" in text["layer_types"]
    assert text["global_head_dim"] > text["head_dim"]

    model = checkpoint.reference_model()
    layers = model.model.language_model.layers
    shared = [layer.self_attn.is_kv_shared_layer for layer in layers]
    assert sum(shared) == text["num_kv_shared_layers"] and shared[-1]
    assert model.model.language_model.embed_tokens_per_layer.weight.shape[1] == (
        text["num_hidden_layers"] * text["hidden_size_per_layer_input"])
    ids = torch.tensor([[2, 10, 300, 301, 302]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_double_wide_mlp_only_on_shared_layers_for_e2b(tiny_e2b):
    checkpoint = load(tiny_e2b, check_shapes=False)
    text = checkpoint.text_config
    first_shared = text["num_hidden_layers"] - text["num_kv_shared_layers"]
    shapes = checkpoint.tensor_shapes
    own = shapes["model.language_model.layers.0.mlp.gate_proj.weight"][0]
    wide = shapes[f"model.language_model.layers.{first_shared}.mlp.gate_proj.weight"][0]
    assert (own, wide) == (text["intermediate_size"], 2 * text["intermediate_size"])


def test_weights_are_deterministic_per_seed(tmp_path):
    from edgekit.testing.checkpoint_writer import make_checkpoint

    a = make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "a", seed=7, layers=3)
    b = make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "b", seed=7, layers=3)
    c = make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "c", seed=8, layers=3)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_shape_presets_use_released_values():
    e2b = build_config(PRESETS["e2b-shape"])["text_config"]
    assert (e2b["hidden_size"], e2b["num_hidden_layers"], e2b["num_key_value_heads"]) == (1536, 35, 1)
    assert (e2b["head_dim"], e2b["global_head_dim"], e2b["num_kv_shared_layers"]) == (256, 512, 20)
    assert e2b["layer_types"].count("full_attention") == 7 and e2b["vocab_size"] == 262144
    e4b = build_config(PRESETS["e4b-shape"])["text_config"]
    assert (e4b["hidden_size"], e4b["num_hidden_layers"], e4b["num_key_value_heads"]) == (2560, 42, 2)
    cut = build_config(PRESETS["e2b-shape"], layers=4)["text_config"]
    assert cut["num_hidden_layers"] == 4 and 0 < cut["num_kv_shared_layers"] < 4


def test_sharded_checkpoint_with_index_loads(tmp_path, monkeypatch):
    from edgekit.testing import checkpoint_writer

    monkeypatch.setattr(checkpoint_writer, "MAX_SHARD_BYTES", 1_000_000)
    path = checkpoint_writer.make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "sharded", layers=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    checkpoint = load(path)
    assert checkpoint.reference_model() is not None


# --- bad checkpoints: each a one-line CheckpointError ----------------------------------

@pytest.fixture
def broken(tiny_e2b, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(tiny_e2b, copy)
    return copy


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(broken)


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load(broken)


def test_missing_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load(broken)


def test_not_gemma4(broken):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'llama' checkpoint, not Gemma 4"):
        read_config(broken)


def test_config_not_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(broken)


def test_truncated_weights(broken):
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(broken)


def test_corrupt_header(broken):
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load(broken)


def test_shape_disagrees_with_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["hidden_size_per_layer_input"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape .* but config.json implies"):
        load(broken)


def test_missing_shard_listed_in_index(tmp_path, monkeypatch):
    from edgekit.testing import checkpoint_writer

    monkeypatch.setattr(checkpoint_writer, "MAX_SHARD_BYTES", 1_000_000)
    path = checkpoint_writer.make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "s", layers=3)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing weight shard model-00002"):
        load(path)


def test_make_checkpoint_refuses_non_empty_dir(tmp_path):
    from edgekit.testing.checkpoint_writer import make_checkpoint

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "x")
    # --overwrite replaces a checkpoint only, never a folder of the user's
    with pytest.raises(InputError, match="edgekit did not write it"):
        make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match="not a directory"):
        make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "file", overwrite=True)


def test_make_checkpoint_overwrites_a_checkpoint_in_place(tmp_path, monkeypatch):
    from edgekit.testing.checkpoint_writer import make_checkpoint

    first = make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "ck", seed=1, layers=3)
    before = (first / "model.safetensors").read_bytes()
    monkeypatch.chdir(first)  # "." as the output: the new one is written beside it, not inside
    make_checkpoint(PRESETS["tiny-e2b"], Path("."), seed=2, layers=3, overwrite=True)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing left aside


def test_make_checkpoint_interrupted_leaves_nothing(tmp_path, monkeypatch):
    from edgekit.testing import checkpoint_writer

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_writer, "_write_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_writer.make_checkpoint(PRESETS["tiny-e2b"], tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


# --- CLI --------------------------------------------------------------------------------

def test_cli_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """systemd or `kill` stops a long command with SIGTERM: its temporary folder goes too,
    one line says so, and the exit status is 128 + 15."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "make-checkpoint", "e2b-shape", str(tmp_path / "ck"),
                             "--layers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".ck.tmp-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["edgekit: error: stopped by SIGTERM"]
    assert list(tmp_path.iterdir()) == []


def test_cli_make_checkpoint_json(tmp_path):
    result = run_cli("make-checkpoint", "tiny-e4b", str(tmp_path / "ck"), "--layers", "6", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["layers"] == 6 and "model.safetensors" in summary["files"]


def test_cli_unknown_preset(tmp_path):
    assert_clean_failure(run_cli("make-checkpoint", "tiny-e9b", str(tmp_path / "ck")), contains="unknown preset")


def test_cli_bad_layer_count(tmp_path):
    assert_clean_failure(run_cli("make-checkpoint", "tiny-e2b", str(tmp_path / "ck"), "--layers", "99"),
                         contains="--layers must be between 1 and 10")
    assert not (tmp_path / "ck").exists()


def test_a_broken_tokenizer_is_a_checkpoint_error_before_any_work(tiny_e2b, tmp_path):
    """The bundle copies the tokenizer at the end of an export: a broken one is found at the
    start instead, in one line (exit 3), before the checkpoint's weights load."""
    import shutil

    from tests.conftest import assert_clean_failure, run_cli

    broken = tmp_path / "broken"
    shutil.copytree(tiny_e2b, broken)
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="is not a tokenizer the tokenizers library reads"):
        load(broken, check_shapes=False)
    result = run_cli("export", str(broken), "--device", "pi5-8gb", "-o", str(tmp_path / "b.edgekit"))
    assert_clean_failure(result, code=3, contains="tokenizer.json is not a tokenizer")
    assert "Loading the checkpoint" not in result.stderr and not (tmp_path / "b.edgekit").exists()
