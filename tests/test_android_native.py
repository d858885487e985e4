"""The native path an Android app runs: ExecuTorch's own C++ MultimodalRunner (the code the
executorch-android AAR's LlmModule calls), on a bundle from `edgekit export --device
android-flagship`, gives the Python runner's greedy tokens for a text, an image and an audio
prompt, reading the bundle's tokenizer.json with its own tokenizer.

Tier: ExecuTorch (needs the executorch wheel, which ships the runner's Python bindings,
executorch.extension.llm.runner); waits for the background `executorch_bundles` exports:
"e4b" (tiny-e4b through `edgekit export --device android-flagship`, its own recipe, every
modality, --external-weights) and "fp32" (tiny-e2b for android-flagship at fp32, vision
budget 70), whose random answers vary more.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.runtimes.image_preprocess import ImageParams, resized_rgb
from edgekit.runtimes.mel_features import MelParams, log_mel_features
from edgekit.runtimes.prompt import prompt_segments
from edgekit.runtimes.sampling import SamplingParams

pytest.importorskip("executorch.runtime")
pytestmark = pytest.mark.executorch_bundles

MAX_NEW_TOKENS = 12


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8))


def _clip() -> np.ndarray:
    t = np.arange(16000) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 1 s of 16 kHz mono


PROMPTS = {
    "text": [{"role": "user", "content": "Where is the train station?"}],
    "image": [{"role": "user", "content": [{"type": "image", "image": None},
                                           {"type": "text", "text": "What is in this picture?"}]}],
    "audio": [{"role": "user", "content": [{"type": "audio", "audio": None},
                                           {"type": "text", "text": "Transcribe this."}]}],
}


def _messages(kind: str) -> list[dict]:
    messages = [dict(m) for m in PROMPTS[kind]]
    if kind != "text":
        messages[0]["content"] = [{**part, kind: _image() if kind == "image" else _clip()} if part["type"] == kind
                                  else part for part in messages[0]["content"]]
    return messages


def _native_inputs(bundle, messages: list[dict]):
    """The stock runner's inputs for `messages`, built as android_demo builds them, from the
    manifest alone: its prompt pieces around the text (prompt_segments, Prompt.kt's twin), each
    image resized to the manifest's target size (uint8, channels first), each clip as real
    log-mel frames (bins first)."""
    import torch
    from executorch.extension.llm.runner import make_audio_input, make_image_input, make_text_input

    manifest = bundle.manifest
    inputs = []
    for segment in prompt_segments(manifest.prompt, messages):
        if isinstance(segment, str):
            inputs.append(make_text_input(segment))
        elif segment[0] == "image":
            rgb = resized_rgb(segment[1], params=ImageParams.from_dict(manifest.image_preprocessing.model_dump()))
            inputs.append(make_image_input(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))))
        else:
            audio = manifest.audio_preprocessing
            features, mask = log_mel_features(segment[1], params=MelParams.from_dict({**audio.model_dump(),
                                                                                     **audio.extra}))
            inputs.append(make_audio_input(torch.from_numpy(np.ascontiguousarray(features[mask].T[None]))))
    return inputs


def _memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB (/proc/self/status), what the app shows."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("VmRSS", "VmHWM")}


_RUNNERS: dict = {}


def _native_runner(bundle):
    """One stock runner per bundle (loading one takes seconds)."""
    from executorch.extension.llm.runner import MultimodalRunner

    if bundle.path not in _RUNNERS:
        manifest = bundle.manifest
        data = manifest.extra.get("program_data")
        _RUNNERS[bundle.path] = MultimodalRunner(str(bundle.file(manifest.extra["program"])),
                                                 str(bundle.file("tokenizer.json")),
                                                 str(bundle.file(data)) if data else None)
    return _RUNNERS[bundle.path]


@pytest.mark.parametrize("bundle_name", ["e4b", "fp32"])
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_stock_runner_gives_the_python_runners_greedy_tokens(kind, bundle_name, executorch_bundles):
    import edgekit.runtimes
    from executorch.extension.llm.runner import GenerationConfig
    from tokenizers import Tokenizer

    bundle = executorch_bundles[bundle_name]
    engine = edgekit.runtimes.load(bundle.path, threads=1)
    messages = _messages(kind)
    for _ in engine.generate(messages, sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS)):
        pass
    expected_ids = list(engine.last_token_ids)

    pieces: list[str] = []
    stats = []
    memory_during_decode: list[dict[str, int]] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        memory_during_decode.append(_memory())

    runner = _native_runner(bundle)
    runner.reset()
    runner.generate(_native_inputs(bundle, messages),
                    GenerationConfig(echo=False, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0), on_piece, stats.append)
    # Same prompt length: the native tokenizer's text pieces plus the encoders' soft tokens
    # fill the positions the Python prompt builder counts.
    assert stats[0].num_prompt_tokens == engine.last_stats.prompt_tokens
    # One callback per token (the prefill's, then each decode step's), each the piece the
    # runner's tokenizer decodes: the same ids give the same count and the same text.
    tokenizer = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    assert len(pieces) == len(expected_ids), (pieces, expected_ids)
    assert "".join(pieces) == tokenizer.decode(expected_ids, skip_special_tokens=False), (pieces, expected_ids)
    rss = max(m["VmRSS"] for m in memory_during_decode) / 1024
    print(f"\n{bundle_name} {kind}: {len(pieces)} tokens {expected_ids}; during decode VmRSS up to {rss:.0f} MiB, "
          f"VmHWM {memory_during_decode[-1]['VmHWM'] / 1024:.0f} MiB (the process: pytest, both runners)")


# --- bad input: what the app refuses before the runner, and what the runner says itself ---------

ANDROID_DEMO = Path(__file__).resolve().parent.parent / "android_demo"


def _app_contract() -> tuple[str, list[str]]:
    """The bundles android_demo takes (gradle.properties -> BuildConfig), checked against edgekit."""
    props = dict(line.split("=", 1) for line in (ANDROID_DEMO / "gradle.properties").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    return props["edgekit.format"], props["edgekit.devices"].split(",")


def test_app_contract_is_edgekits_android_profiles():
    from edgekit.profiles import load_profiles

    fmt, devices = _app_contract()
    android = sorted(p.name for p in load_profiles() if p.name.startswith("android"))
    assert sorted(devices) == android
    assert {load_profiles().get(d).format for d in devices} == {fmt}


def test_app_refuses_a_bundle_for_another_format_device_or_with_a_data_file(executorch_bundles):
    from edgekit.errors import BundleError
    from edgekit.manifest_checks import check_app_target

    fmt, devices = _app_contract()
    manifest = executorch_bundles["fp32"].manifest
    check_app_target(manifest, format=fmt, devices=devices, data_files=False)  # what the app loads
    cases = {
        "this is a onnx bundle; this app runs executorch bundles": manifest.model_copy(update={"format": "onnx"}),
        "exported for pi5-8gb; this app takes bundles for android-flagship, android-midrange":
            manifest.model_copy(update={"device": "pi5-8gb"}),
        "no prompt pieces": manifest.model_copy(update={"prompt": None}),
        "model.ptd (--external-weights)": executorch_bundles["e4b"].manifest,
    }
    for message, bad in cases.items():
        with pytest.raises(BundleError, match=re.escape(message)) as caught:
            check_app_target(bad, format=fmt, devices=devices, data_files=False)
        assert "\n" not in str(caught.value)


def _copy(bundle, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle.path, tmp_path / bundle.path.name))


def test_a_file_that_disagrees_with_the_manifest_is_refused(executorch_bundles, tmp_path):
    from edgekit.bundle import load_bundle
    from edgekit.errors import BundleError

    copy = _copy(executorch_bundles["fp32"], tmp_path)
    pte = copy / executorch_bundles["fp32"].manifest.extra["program"]
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 sees it
    pte.write_bytes(bytes(data))
    load_bundle(copy, verify="sizes")
    with pytest.raises(BundleError, match="corrupt: sha256"):
        load_bundle(copy, verify="full")
    pte.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BundleError, match="truncated or changed"):
        load_bundle(copy, verify="sizes")
    # The stock runner itself on the truncated program, in a child process in case it crashes.
    probe = ("import sys\nfrom executorch.extension.llm.runner import MultimodalRunner\n"
             "try:\n    MultimodalRunner(sys.argv[1], sys.argv[2], None)\n"
             "except Exception as e:\n    print('refused:', str(e).splitlines()[0]); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(pte), str(copy / "tokenizer.json")],
                            capture_output=True, text=True, timeout=300)
    print(f"\nstock runner on a truncated model.pte: exit {result.returncode}, {result.stdout.strip()!r}")
    assert result.returncode >= 0, f"the stock runner crashed (signal {-result.returncode}) on a truncated .pte"


def test_a_prompt_past_the_context_is_refused_by_the_runner(executorch_bundles):
    from executorch.extension.llm.runner import GenerationConfig, make_text_input

    bundle = executorch_bundles["fp32"]
    runner = _native_runner(bundle)
    runner.reset()
    words = " ".join(["station"] * (bundle.manifest.max_context + 8))
    with pytest.raises(Exception) as caught:  # the bindings raise RuntimeError with the runner's error
        runner.generate([make_text_input(bundle.manifest.prompt.begin + words)],
                        GenerationConfig(echo=False, max_new_tokens=4, temperature=0.0), lambda piece: None, None)
    print(f"\nstock runner, prompt past the context: {type(caught.value).__name__}: {str(caught.value).splitlines()[0]}")
    runner.reset()


def test_an_undecodable_image_is_a_message(tmp_path):
    from edgekit.errors import InputError

    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError) as caught:
        resized_rgb(bad, params=ImageParams(patch_size=16, pooling_kernel_size=3, max_soft_tokens=70))
    assert "\n" not in str(caught.value)


_DECODE_MEMORY = """
import json, sys
from pathlib import Path

def rss():
    status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
    return {k: int(status[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_text_input
import executorch.kernels.quantized  # the quantized embedding kernels register on import
import torch
program, tokenizer, data, text, steps, llm_ops = sys.argv[1:7]
if llm_ops:
    torch.ops.load_library(llm_ops)  # llama::custom_sdpa, update_cache
# the interpreter, the bindings and the kernel libraries (they bring libtorch, which an app's
# ExecuTorch build does not have): no program yet
before = rss()
runner = MultimodalRunner(program, tokenizer, data or None)
during = []
runner.generate([make_text_input(text)], GenerationConfig(echo=False, max_new_tokens=int(steps), temperature=0.0),
                lambda piece: during.append(rss()), None)
print(json.dumps({"before_load": before, "during_decode": during}))
"""


def test_resident_memory_of_the_stock_runner_during_decode(executorch_bundles, tiny_e4b):
    """What the stock runner itself holds while it decodes, in a process of its own: VmRSS during
    decode less the process's before the program loads (the bindings and kernel libraries bring
    torch, an app does not). Printed with -s; android_demo/README.md's figure comes from here."""
    import json

    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles
    from edgekit.runtimes.backends.executorch_backend import llm_ops_library, needs_llm_ops

    bundle = executorch_bundles["e4b"]
    manifest = bundle.manifest
    data = manifest.extra.get("program_data")
    text = manifest.prompt.begin + manifest.prompt.user_start + "Where is the train station?" + \
        manifest.prompt.user_end + manifest.prompt.generation_prompt
    result = subprocess.run([sys.executable, "-c", _DECODE_MEMORY, str(bundle.file(manifest.extra["program"])),
                             str(bundle.file("tokenizer.json")), str(bundle.file(data)) if data else "", text, "16",
                             str(llm_ops_library()) if needs_llm_ops(manifest) else ""],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    during = report["during_decode"]
    assert len(during) >= 2
    own = max(m["VmRSS"] for m in during) - report["before_load"]["VmRSS"]
    program_mib = sum(bundle.file(f).stat().st_size for f in (manifest.extra["program"], data) if f) / 2**20
    print(f"\nstock runner, e4b tiny bundle ({program_mib:.0f} MiB of program and data), 16 decode steps: VmRSS "
          f"{max(m['VmRSS'] for m in during)} MiB, of which {own} MiB over the interpreter before loading "
          f"(RssAnon {during[-1]['RssAnon']} MiB, RssFile {during[-1]['RssFile']} MiB)")
    # The plan counts 150 MiB for this bundle (weights, KV cache, activations); the stock runner
    # held 448 MiB more than before loading when measured (2026-12-08): it takes about 3x what
    # the plan says, cause not yet found. This bound catches it growing further.
    plan = make_plan(tiny_e4b, profile=load_profiles().get(manifest.device), context=manifest.max_context)
    assert 0 < own <= 3.5 * plan.memory.total_bytes / 2**20, (own, plan.memory)
