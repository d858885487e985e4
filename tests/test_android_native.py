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

import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.runtimes.image_preprocess import ImageParams, resized_rgb
from edgekit.runtimes.mel_features import MelParams, log_mel_features
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


def _native_inputs(engine, messages: list[dict]):
    """The stock runner's inputs for `messages`, built as an app builds them: the bundle's
    chat template rendered, each media placeholder replaced by its begin marker, the media
    (resized uint8 image channels first; real log-mel frames, bins first) and its end marker."""
    import torch
    from executorch.extension.llm.runner import make_audio_input, make_image_input, make_text_input

    manifest = engine.bundle.manifest
    tokens = engine.prompts.template.special_tokens
    text = engine.prompts.template.render(messages)
    inputs = []
    for part in messages[0]["content"] if not isinstance(messages[0]["content"], str) else ():
        if part["type"] == "image":
            before, text = text.split(tokens["image_token"], 1)
            rgb = resized_rgb(part["image"], params=ImageParams.from_dict(manifest.image_preprocessing.model_dump()))
            inputs += [make_text_input(before + tokens["boi_token"]),
                       make_image_input(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))]
            text = tokens["eoi_token"] + text
        elif part["type"] == "audio":
            before, text = text.split(tokens["audio_token"], 1)
            audio = manifest.audio_preprocessing
            features, mask = log_mel_features(part["audio"], params=MelParams.from_dict({**audio.model_dump(),
                                                                                          **audio.extra}))
            real = np.ascontiguousarray(features[mask].T[None])  # [1, bins, frames]
            inputs += [make_text_input(before + tokens["boa_token"]), make_audio_input(torch.from_numpy(real))]
            text = tokens["eoa_token"] + text
    return [*inputs, make_text_input(text)]


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
    rss_during_decode: list[int] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        rss_during_decode.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    runner = _native_runner(bundle)
    runner.reset()
    runner.generate(_native_inputs(engine, messages),
                    GenerationConfig(echo=False, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0), on_piece, stats.append)
    # Same prompt length: the native tokenizer's text pieces plus the encoders' soft tokens
    # fill the positions the Python prompt builder counts.
    assert stats[0].num_prompt_tokens == engine.last_stats.prompt_tokens
    # One callback per token (the prefill's, then each decode step's), each the piece the
    # runner's tokenizer decodes: the same ids give the same count and the same text.
    tokenizer = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    assert len(pieces) == len(expected_ids), (pieces, expected_ids)
    assert "".join(pieces) == tokenizer.decode(expected_ids, skip_special_tokens=False), (pieces, expected_ids)
    print(f"\n{bundle_name} {kind}: {len(pieces)} tokens {expected_ids}; "
          f"peak RSS by the last decode step {rss_during_decode[-1] / 1024:.0f} MiB (process, both runners)")
