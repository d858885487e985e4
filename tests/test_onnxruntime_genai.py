"""Interop tier: the released onnxruntime-genai loads an edgekit ONNX bundle and generates.

Its genai_config.json, graph names and processor files are what onnxruntime-genai's
Gemma 4 support (0.15+, PR #2103 / #2188) reads; greedy text tokens must equal edgekit's
own runner on the same prompt ids.
"""

from __future__ import annotations

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")

PROMPT = "<bos><|turn>user\nHow do I get to the station?<turn|>\n<|turn>model\n"


def _og_generate(model, tokenizer, inputs=None, ids=None, steps: int = 8) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=2048, do_sample=False)
    generator = og.Generator(model, params)
    if inputs is not None:
        generator.set_inputs(inputs)
    else:
        generator.append_tokens(ids)
    out = []
    while not generator.is_done() and len(out) < steps:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_text_generation_matches_edgekit_runner(onnx_fp32_bundle):
    from edgekit.runtimes import load

    model = og.Model(str(onnx_fp32_bundle))
    tokenizer = og.Tokenizer(model)
    ids = np.asarray(tokenizer.encode(PROMPT), np.int64)
    theirs = _og_generate(model, tokenizer, ids=ids)

    backend = load(onnx_fp32_bundle).backend
    logits = backend.forward(ids)[-1]
    ours = []
    for _ in range(len(theirs)):
        ours.append(int(logits.argmax()))
        logits = backend.forward(np.asarray([ours[-1]], np.int64))[-1]
    assert ours == theirs


def test_image_and_audio_prompts_run(onnx_fp32_bundle, tmp_path):
    import wave

    from edgekit.export.verify import test_audio, test_image

    image = tmp_path / "picture.png"
    test_image(200, 300).save(image)
    clip = tmp_path / "clip.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((test_audio(1.5) * 32767).astype("<i2").tobytes())
    model = og.Model(str(onnx_fp32_bundle))
    tokenizer = og.Tokenizer(model)
    processor = model.create_multimodal_processor()
    image_inputs = processor(PROMPT.replace("\nHow", "\n<|image|>How"), images=og.Images.open(str(image)))
    audio_inputs = processor(PROMPT.replace("\nHow", "\n<|audio|>How"), audios=og.Audios.open(str(clip)))
    assert len(_og_generate(model, tokenizer, inputs=image_inputs, steps=3)) == 3
    assert len(_og_generate(model, tokenizer, inputs=audio_inputs, steps=3)) == 3
