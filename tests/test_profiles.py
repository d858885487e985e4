"""CPU unit tests: devices.yaml loading and checking, the recipe and format registries,
and `edgekit devices`. No checkpoint, no torch.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

from edgekit.errors import DeviceProfileError, InputError
from edgekit.formats import FORMATS, get_format
from edgekit.manifest import format_names
from edgekit.profiles import PACKAGED_PROFILES, VISION_TOKEN_BUDGETS, load_profiles
from edgekit.recipes import RECIPES, Recipe, Rule, get_recipe
from edgekit.registry import Registry
from tests.conftest import assert_clean_failure, run_cli

REQUIRED_DEVICES = ("pi4-4gb", "pi5-8gb", "jetson-orin-nano-8gb", "android-flagship", "android-midrange",
                    "iphone-15-pro", "mac-m-series")


# --- the packaged devices.yaml -----------------------------------------------------------


def test_packaged_profiles_load_and_cover_the_target_devices():
    profiles = load_profiles()
    assert set(REQUIRED_DEVICES) <= set(profiles.names())
    for p in profiles:
        assert get_format(p.format).supports(p.recipe)
        assert p.vision_token_budget in VISION_TOKEN_BUDGETS
        assert "text" in p.modalities and 0 < p.bundle_memory_share <= 1


def test_profiles_state_the_hardware_facts_the_kernels_depend_on():
    profiles = load_profiles()
    assert "dotprod" not in profiles.get("pi4-4gb").cpu.isa  # Cortex-A72: Armv8.0
    assert "dotprod" in profiles.get("pi5-8gb").cpu.isa  # Cortex-A76: Armv8.2
    assert "i8mm" not in profiles.get("pi5-8gb").cpu.isa
    assert "i8mm" in profiles.get("android-flagship").cpu.isa
    jetson = profiles.get("jetson-orin-nano-8gb")
    assert (jetson.format, jetson.backend) == ("onnx", "cuda")
    assert jetson.execution_providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert profiles.get("pi5-8gb").execution_providers == ("CPUExecutionProvider",)
    assert {profiles.get(n).format for n in ("android-flagship", "android-midrange")} == {"executorch"}
    assert {profiles.get(n).format for n in ("iphone-15-pro", "mac-m-series")} == {"coreml"}
    assert profiles.get("android-flagship").ram_gb == 12 and profiles.get("android-midrange").ram_gb == 6


def test_packaged_file_is_the_top_level_devices_yaml():
    # edgekit/devices.yaml links to the repository's devices.yaml: one file, two paths.
    assert PACKAGED_PROFILES.read_text() == (PACKAGED_PROFILES.parent.parent / "devices.yaml").read_text()


def test_unknown_device_lists_known_names():
    with pytest.raises(DeviceProfileError, match="unknown device 'pi3'.*pi5-8gb"):
        load_profiles().get("pi3")


# --- validation on load ------------------------------------------------------------------


def _entries() -> list[dict]:
    return copy.deepcopy(yaml.safe_load(PACKAGED_PROFILES.read_text())["devices"])


def _write(tmp_path, entries) -> object:
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": entries}))
    return path


def _broken(tmp_path, name: str, edit) -> object:
    entries = _entries()
    edit(next(e for e in entries if e["name"] == name))
    return _write(tmp_path, entries)


BROKEN = [
    ("pi5-8gb", lambda e: e.update(ram_gb="eight"),
     "devices.yaml: profile 'pi5-8gb': key 'ram_gb' must be a number, got 'eight'"),
    ("pi5-8gb", lambda e: e.pop("max_context"), "profile 'pi5-8gb': key 'max_context' is missing"),
    ("pi5-8gb", lambda e: e.update(ramgb=8), "key 'ramgb' is unknown"),
    ("pi5-8gb", lambda e: e.update(bundle_memory_share=1.5), "key 'bundle_memory_share' must be at most 1.0, got 1.5"),
    ("pi5-8gb", lambda e: e.update(bundle_memory_share=0), "key 'bundle_memory_share' must be greater than 0"),
    ("pi5-8gb", lambda e: e.update(format="tflite"), "key 'format' must be one of 'onnx', 'executorch' or 'coreml', got 'tflite'"),
    ("pi5-8gb", lambda e: e.update(recipe="8da4w"), "key 'recipe' '8da4w' is not supported by format 'onnx'"),
    ("pi5-8gb", lambda e: e.update(recipe="int3"), "key 'recipe' must be one of"),
    ("pi5-8gb", lambda e: e.update(backend="xnnpack"), "key 'backend' 'xnnpack' is not a backend of format 'onnx'"),
    ("pi5-8gb", lambda e: e.update(vision_token_budget=300), "key 'vision_token_budget' must be one of 70, 140"),
    ("pi5-8gb", lambda e: e.update(modalities=["text", "smell"]), "key 'modalities[1]' must be one of 'text', 'audio' or 'vision', got 'smell'"),
    ("pi5-8gb", lambda e: e.update(modalities=["audio"]), "key 'modalities' must include 'text'"),
    ("pi5-8gb", lambda e: e.update(modalities=["text", "text"]), "key 'modalities' must not repeat an entry"),
    ("pi5-8gb", lambda e: e.update(max_context=0), "key 'max_context' must be greater than 0"),
    ("pi5-8gb", lambda e: e.update(description="  "), "key 'description'"),
    ("pi5-8gb", lambda e: e["cpu"].update(sockets=2), "key 'cpu.sockets' is unknown"),
    ("pi5-8gb", lambda e: e.update(model="e8b"), "key 'model' must be one of 'e2b' or 'e4b'"),
    ("pi5-8gb", lambda e: e.update(max_context=True), "key 'max_context' must be an integer, got True"),
    ("pi5-8gb", lambda e: e["cpu"].update(isa=["neon", "dotprd"]), "key 'cpu.isa[1]' must be one of 'neon'"),
    ("pi5-8gb", lambda e: e["cpu"].update(cores="four"), "key 'cpu.cores' must be an integer, got 'four'"),
    ("pi5-8gb", lambda e: e["cpu"].pop("arch"), "key 'cpu.arch' is missing"),
    ("pi5-8gb", lambda e: e.update(accelerators=[{"kind": "tpu", "name": "x"}]), "key 'accelerators[0].kind'"),
    ("pi5-8gb", lambda e: e.pop("execution_providers"), "key 'execution_providers' must list at least one provider"),
    ("pi5-8gb", lambda e: e.update(execution_providers=["CUDAExecutionProvider"]),
     "key 'execution_providers' has unknown entry 'CUDAExecutionProvider'"),
    ("android-flagship", lambda e: e.update(execution_providers=["CPUExecutionProvider"]),
     "key 'execution_providers' only applies to format onnx"),
]


@pytest.mark.parametrize("name, edit, message", BROKEN, ids=[m.split("key ")[-1][:40] for *_, m in BROKEN])
def test_broken_profile_names_profile_and_key(tmp_path, name, edit, message):
    with pytest.raises(DeviceProfileError) as info:
        load_profiles(_broken(tmp_path, name, edit))
    assert message in str(info.value)


def test_duplicate_profile_is_an_error(tmp_path):
    entries = _entries()
    with pytest.raises(DeviceProfileError, match="duplicate profile 'pi4-4gb'"):
        load_profiles(_write(tmp_path, entries + [entries[0]]))


@pytest.mark.parametrize("text, message", [
    ("devices: [\n  - name: x\n", "not valid YAML"),
    ("profiles: []\n", "one key 'devices'"),
    ("devices:\n  - ram_gb: 4\n", "entry 1 must be a mapping with a 'name'"),
])
def test_malformed_file(tmp_path, text, message):
    path = tmp_path / "devices.yaml"
    path.write_text(text)
    with pytest.raises(DeviceProfileError, match=message):
        load_profiles(path)


def test_missing_file(tmp_path):
    with pytest.raises(DeviceProfileError, match="cannot read device profiles"):
        load_profiles(tmp_path / "nope.yaml")


def test_a_new_device_needs_only_a_yaml_entry(tmp_path):
    entries = _entries()
    new = {**copy.deepcopy(entries[1]), "name": "rock5b-16gb", "ram_gb": 16}
    profiles = load_profiles(_write(tmp_path, entries + [new]))
    assert profiles.get("rock5b-16gb").memory_budget_bytes == int(16 * 1024**3 * new["bundle_memory_share"])


# --- recipes and formats -----------------------------------------------------------------


def test_recipe_bits_include_scale_overhead():
    assert get_recipe("8da4w").bits_for("text_decoder", "linear") == 4 + 16 / 32
    assert get_recipe("8da4w-g128").bits_for("text_decoder", "linear") == 4 + 16 / 128
    assert get_recipe("int4").bits_for("text_decoder", "linear") == 4 + 32 / 32  # symmetric, fp32 scale
    assert get_recipe("int4-b64").bits_for("per_layer_embedding", "embedding") == 4 + 16 / 64  # fp16 scales
    assert get_recipe("fp32").bits_for("vision_encoder", "other") == 32
    emb4 = get_recipe("8da4w-emb4")
    assert emb4.bits_for("token_embedding", "embedding") == 4.5
    assert emb4.scheme_for("audio_encoder", "linear").name == "8da8w"
    assert emb4.scheme_for("vision_encoder", "linear").activations == "int8_dynamic"
    assert emb4.bits_for("text_decoder", "other") == 16  # norms stay float


def test_first_matching_rule_wins():
    fp32, int8 = get_recipe("fp32").rules[0].scheme, get_recipe("int8").rules[0].scheme
    recipe = Recipe("t", "test", (Rule("text_decoder.*", int8), Rule("*", fp32)))
    assert recipe.scheme_for("text_decoder", "linear") is int8
    assert recipe.scheme_for("audio_encoder", "linear") is fp32


def test_formats_accept_only_known_recipes_and_match_the_manifest():
    assert FORMATS.names() == format_names()
    for fmt in FORMATS:
        assert all(r in RECIPES for r in fmt.recipes)
    assert not get_format("executorch").supports("int8")  # weight-only linears are wrong on XNNPACK
    assert get_format("onnx").extension == ".onnx" and get_format("executorch").extension == ".pte"


def test_registry_lookup_errors():
    with pytest.raises(InputError, match="unknown format 'tflite'; choose one of: onnx, executorch, coreml"):
        get_format("tflite")
    with pytest.raises(InputError, match="unknown quantization recipe 'int3'.*8da4w"):
        get_recipe("int3")
    with pytest.raises(InputError, match="duplicate format 'onnx'"):
        Registry("format", [get_format("onnx"), get_format("onnx")])


# --- CLI ---------------------------------------------------------------------------------


def test_cli_devices_json():
    result = run_cli("devices", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    profiles = json.loads(result.stdout)
    assert [p["name"] for p in profiles] == list(load_profiles().names())
    assert {"ram_gb", "cpu", "format", "recipe", "memory_budget_bytes"} <= set(profiles[0])


def test_cli_devices_table():
    result = run_cli("devices", timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in REQUIRED_DEVICES)


# --- the generated schema ----------------------------------------------------------------


def test_committed_devices_schema_is_the_generated_one():
    # Regenerate with: python -m edgekit.profiles --schema > edgekit/devices.schema.json
    import jsonschema

    from edgekit.profiles import schema_json

    committed = PACKAGED_PROFILES.parent / "devices.schema.json"
    assert committed.read_text() == schema_json()
    schema = json.loads(committed.read_text())
    jsonschema.validate(yaml.safe_load(PACKAGED_PROFILES.read_text()), schema,
                        cls=jsonschema.Draft202012Validator)


# --- the user's own profiles -------------------------------------------------------------


def _user_file(tmp_path, name: str, entries: list[dict]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"devices": entries}))
    return str(path)


def _pi5(**changes) -> dict:
    return {**next(e for e in _entries() if e["name"] == "pi5-8gb"), **changes}


def test_cli_devices_file_adds_and_overrides_profiles(tmp_path):
    mine = _user_file(tmp_path, "mine.yaml", [_pi5(name="rock5b-16gb", ram_gb=16), _pi5(ram_gb=16)])
    result = run_cli("devices", "--json", "--devices", mine, timeout=60)
    assert result.returncode == 0, result.stderr
    profiles = {p["name"]: p for p in json.loads(result.stdout)}
    assert profiles["rock5b-16gb"]["ram_gb"] == 16  # added
    assert profiles["pi5-8gb"]["ram_gb"] == 16  # replaced by name
    assert set(REQUIRED_DEVICES) <= set(profiles)  # the packaged ones stay


def test_environment_files_apply_in_order_and_devices_option_wins(tmp_path):
    first = _user_file(tmp_path, "a.yaml", [_pi5(ram_gb=10), _pi5(name="extra-a")])
    second = _user_file(tmp_path, "b.yaml", [_pi5(ram_gb=12)])
    last = _user_file(tmp_path, "c.yaml", [_pi5(ram_gb=14)])
    env = {"EDGEKIT_DEVICES": os.pathsep.join([first, second])}
    result = run_cli("devices", "--json", env=env, timeout=60)
    profiles = {p["name"]: p for p in json.loads(result.stdout)}
    assert profiles["pi5-8gb"]["ram_gb"] == 12 and "extra-a" in profiles
    result = run_cli("devices", "--json", "--devices", last, env=env, timeout=60)
    assert {p["name"]: p for p in json.loads(result.stdout)}["pi5-8gb"]["ram_gb"] == 14


@pytest.mark.parametrize("command", [("devices",), ("plan", "no-such-checkpoint", "--device", "pi5-8gb"),
                                     ("export", "no-such-checkpoint", "--device", "pi5-8gb")])
def test_bad_user_file_is_one_line_naming_it(tmp_path, command):
    bad = _user_file(tmp_path, "bad.yaml", [_pi5(ram_gb="lots")])
    result = run_cli(*command, "--devices", bad, timeout=60)
    assert_clean_failure(result, code=4, contains=f"{bad}: profile 'pi5-8gb': key 'ram_gb' must be a number")
    result = run_cli(*command, env={"EDGEKIT_DEVICES": str(tmp_path / "missing.yaml")}, timeout=60)
    assert_clean_failure(result, code=4, contains=f"cannot read device profiles {tmp_path / 'missing.yaml'}")
