"""Runner tier: `edgekit run` / `chat` and edgekit.runtimes.load on a real ONNX bundle.

Greedy answers are compared with transformers' own pipeline (its processor and
generate()) on the same text, image and audio; the torch-free claim is tested in a
process where importing torch or transformers fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import update_manifest
from edgekit.errors import BundleError, InputError
from edgekit.runtimes import load
from edgekit.runtimes.sampling import SamplingParams
from tests.conftest import ROOT, assert_clean_failure, run_cli

GREEDY = SamplingParams(max_new_tokens=24)


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def _speechlike(seconds: float, rate: int = 16000) -> np.ndarray:
    from edgekit.export.verify import test_audio

    return test_audio(seconds, rate)


def _reference_tokens(checkpoint: Path, messages: list[dict], *, images=(), audio=(), steps: int = 24,
                      vision_budget: int | None = None) -> list[int]:
    """transformers end to end: its processor builds the inputs, generate() answers."""
    import torch

    from edgekit.checkpoint import load as load_checkpoint
    from edgekit.models.gemma4.processor_files import load_reference_processor

    processor = load_reference_processor(checkpoint)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"images": list(images)} if images else {}
    if images and vision_budget:
        kwargs["max_soft_tokens"] = vision_budget  # the bundle's budget (the processor's default: 280)
    if audio:
        kwargs["audio"] = list(audio)
    inputs = processor(text=text, return_tensors="pt", **kwargs)
    model = load_checkpoint(checkpoint).reference_model()
    inputs = {k: v for k, v in inputs.items() if k not in ("mm_token_type_ids", "num_soft_tokens_per_image")}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _answer_tokens(bundle: Path, messages: list[dict]) -> list[int]:
    engine = load(bundle)
    "".join(engine.generate(messages, sampling=GREEDY))
    return engine.last_token_ids


def _trim(tokens: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


@pytest.fixture(params=["onnx", pytest.param("executorch", marks=pytest.mark.executorch_bundles)])
def fp32_bundle(request) -> Path:
    """The tiny-e2b fp32 bundle of each format (ONNX: pi5 profile; ExecuTorch: vision budget 70)."""
    if request.param == "onnx":
        return request.getfixturevalue("onnx_fp32_bundle")
    pytest.importorskip("executorch.runtime")
    return request.getfixturevalue("executorch_bundles")["fp32"].path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_greedy_answer_equals_transformers(fp32_bundle, tiny_e2b, tmp_path, kind):
    from edgekit.bundle import load_bundle
    from edgekit.export.verify import test_image

    manifest = load_bundle(fp32_bundle).manifest
    stops = set(manifest.special_tokens.eos_ids)
    if kind == "text":
        ours_msg = ref_msg = [{"role": "user", "content": "Tell me about the Raspberry Pi."}]
        ref = _reference_tokens(tiny_e2b, ref_msg)
    elif kind == "image":
        image_path = tmp_path / "picture.png"
        test_image(200, 300).save(image_path)
        ours_msg = [{"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                                 {"type": "text", "text": "What is this?"}]}]
        ref_msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
        from PIL import Image

        ref = _reference_tokens(tiny_e2b, ref_msg, images=[Image.open(image_path).convert("RGB")],
                                vision_budget=manifest.image_preprocessing.max_soft_tokens)
    else:
        wav = _write_wav(tmp_path / "clip.wav", _speechlike(1.7))
        ours_msg = [{"role": "user", "content": [{"type": "audio", "audio": str(wav)},
                                                 {"type": "text", "text": "Transcribe this."}]}]
        ref_msg = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe this."}]}]
        from edgekit.runtimes.wav_io import load_audio

        ref = _reference_tokens(tiny_e2b, ref_msg, audio=[load_audio(wav)])
    ours = _answer_tokens(fp32_bundle, ours_msg)
    assert _trim(ours, stops) == _trim(ref, stops)


def test_runner_needs_neither_torch_nor_transformers(onnx_fp32_bundle, tmp_path):
    wav = _write_wav(tmp_path / "clip.wav", _speechlike(1.0))
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        from edgekit.cli import main
        main(["run", {str(onnx_fp32_bundle)!r}, "--prompt", "Hi", "--audio", {str(wav)!r},
              "--max-new-tokens", "5", "--json"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["stats"]["new_tokens"] >= 1 and out["stats"]["audio_seconds"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_executorch_bundle_without_the_runtime_names_the_extra(executorch_bundles):
    """An ExecuTorch bundle where the executorch package is missing: exit 10, one line, the extra."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "executorch":
                    raise ImportError("No module named " + repr(name))
                return None
        sys.meta_path.insert(0, Block())
        from edgekit.cli import main
        main(["run", {str(executorch_bundles["fp32"].path)!r}, "--prompt", "Hi"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_clean_failure(result, code=10, contains="pip install 'gemma-edgekit[executorch]'")


def test_chat_reuses_the_cache_and_answers_as_a_fresh_session(onnx_fp32_bundle):
    engine = load(onnx_fp32_bundle)
    history = [{"role": "user", "content": "Hello!"}]
    first = "".join(engine.generate(history, sampling=GREEDY))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = "".join(engine.generate(history, sampling=GREEDY))
    stats = engine.last_stats
    assert stats.prefilled_tokens < stats.prompt_tokens  # only the new turn was fed
    fresh = load(onnx_fp32_bundle)
    assert "".join(fresh.generate(history, sampling=GREEDY)) == second
    assert fresh.last_stats.prefilled_tokens == fresh.last_stats.prompt_tokens


def _sliding_rows(engine) -> int:
    sliding, _window = engine.backend._sliding_past
    return max(v.shape[2] for k, v in engine.backend._past.items() if k in sliding)


def test_chat_after_an_answer_longer_than_the_window_reuses_the_cache(onnx_fp32_bundle):
    """The sliding layers' rows are cut as the prompt is fed, but not those back to where the
    answer began: the next turn re-renders the whole answer, and still feeds only itself."""
    slack = 12  # the tiny tokenizer spells the generation prompt's empty thought channel in ~10 tokens
    engine = load(onnx_fp32_bundle)
    engine.backend.sliding_slack = slack
    history = [{"role": "user", "content": "Hello there, tell me a long story about a robot. " * 4}]
    first = "".join(engine.generate(history, sampling=GREEDY))
    answer_start = engine.last_stats.prompt_tokens
    # Cut from the last token, at most window - 1 + 2 * slack rows stay: too few to go back 24 + ~10.
    assert engine.last_stats.new_tokens == GREEDY.max_new_tokens > 2 * slack - 10
    assert _sliding_rows(engine) < answer_start  # the prompt's oldest rows were cut
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = "".join(engine.generate(history, sampling=GREEDY))
    stats = engine.last_stats
    assert stats.prompt_tokens - stats.prefilled_tokens >= answer_start - slack  # went back into the cache
    assert "".join(load(onnx_fp32_bundle).generate(history, sampling=GREEDY)) == second


def test_chat_past_the_kept_sliding_rows_feeds_the_prompt_again(onnx_fp32_bundle):
    """With the sliding layers' rows kept only 1 position before the answer began, the next
    turn (which re-renders a few template tokens before it) cannot go back into the cache: the
    engine feeds the whole prompt and answers as a fresh session."""
    engine = load(onnx_fp32_bundle)
    engine.backend.sliding_slack = 1
    history = [{"role": "user", "content": "Hello there, tell me a story."}]
    first = "".join(engine.generate(history, sampling=GREEDY))
    _sliding, window = engine.backend._sliding_past
    assert engine.last_stats.prompt_tokens > window + 1
    assert _sliding_rows(engine) < engine.backend.position  # the rows were cut
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = "".join(engine.generate(history, sampling=GREEDY))
    assert engine.last_stats.prefilled_tokens == engine.last_stats.prompt_tokens
    assert "".join(load(onnx_fp32_bundle).generate(history, sampling=GREEDY)) == second


def test_cli_chat_over_stdin(onnx_fp32_bundle):
    result = run_cli("chat", str(onnx_fp32_bundle), "--max-new-tokens", "4", "--stats",
                     input="Hello\nWhat next?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("decode") == 2  # one stats line per answer


def test_cli_chat_drops_a_failed_message_and_goes_on(onnx_fp32_bundle, tmp_path):
    """A message whose attachment cannot be read fails alone: one error line, the later
    messages are answered, and the exit status says a turn failed."""
    missing = tmp_path / "missing.wav"
    result = run_cli("chat", str(onnx_fp32_bundle), "--max-new-tokens", "4", "--stats",
                     input=f"/audio {missing}\nHello\nWhat next?\nAnd then?\n/exit\n")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("edgekit: error:") == 1 and "missing.wav" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("decode") == 2  # both later messages answered


def test_text_that_is_not_utf8_is_an_input_error_and_chat_goes_on(onnx_fp32_bundle):
    """Bytes that are not UTF-8 (a shell passes them through): one line, exit 2; in chat that
    message is dropped and the next one answered."""
    base = [sys.executable, "-m", "edgekit"]
    run = subprocess.run([*base, "run", str(onnx_fp32_bundle).encode(), b"-p", b"caf\xe9 \xff",
                          b"--max-new-tokens", b"2"], capture_output=True, cwd=ROOT, timeout=300)
    assert_clean_failure(subprocess.CompletedProcess(run.args, run.returncode, run.stdout.decode(),
                                                     run.stderr.decode()), code=2, contains="not valid UTF-8")
    chat = subprocess.run([*base, "chat", str(onnx_fp32_bundle), "--max-new-tokens", "2", "--stats"],
                          input=b"\xff\xfe bad\nHello\n/exit\n", capture_output=True, cwd=ROOT, timeout=300)
    stderr = chat.stderr.decode()
    assert chat.returncode == 2 and stderr.count("edgekit: error:") == 1 and "not valid UTF-8" in stderr, stderr
    assert stderr.count("decode") == 1  # Hello answered


def test_chat_after_an_interrupted_prefill_does_not_trust_the_unwritten_positions(onnx_fp32_bundle):
    """A turn whose prompt feed fails part-way can leave the cache at the old conversation's
    length, its later rows overwritten; asking the first question again must not reuse them."""
    engine = load(onnx_fp32_bundle)
    question = [{"role": "user", "content": "Hello there, tell me a story."}]
    history = question + [{"role": "assistant", "content": "".join(engine.generate(question, sampling=GREEDY))},
                          {"role": "user", "content": "And then, what happened to everyone in the town?"}]
    cached = list(engine._cached_ids)
    ids = engine.prompts.build(history, image_soft_tokens=[], audio_soft_tokens=[]).input_ids.tolist()
    common = next(i for i, (a, b) in enumerate(zip(cached, ids)) if a != b)
    engine.prefill_chunk = len(cached) - common  # the first chunk ends where the old cache did
    forward, calls = engine.backend.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return forward(*args, **kwargs)

    engine.backend.forward = failing_forward
    with pytest.raises(RuntimeError, match="interrupted"):
        "".join(engine.generate(history, sampling=GREEDY))
    assert engine.backend.position == len(cached)  # as long as before, other tokens in its tail
    engine.backend.forward = forward
    again = "".join(engine.generate(question, sampling=GREEDY))
    stats = engine.last_stats
    assert stats.prompt_tokens - stats.prefilled_tokens <= common  # no overwritten row reused
    assert again == "".join(load(onnx_fp32_bundle).generate(question, sampling=GREEDY))


def test_run_think_json_keeps_the_thought_apart(onnx_fp32_bundle):
    result = run_cli("run", str(onnx_fp32_bundle), "--prompt", "Hi", "--think", "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out["thought"], str) and "<|channel>" not in out["text"] + out["thought"]
    assert out["stats"]["new_tokens"] == 6 or out["stats"]["stop_reason"] == "stop_token"


def test_run_streams_and_reports_stats(onnx_fp32_bundle):
    result = run_cli("run", str(onnx_fp32_bundle), "--prompt", "Hi", "--max-new-tokens", "6", "--stats")
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "peak RSS" in result.stderr and "encode" not in result.stderr
    clip = ROOT / "tests" / "assets" / "speech_en.wav"
    heard = run_cli("run", str(onnx_fp32_bundle), "--prompt", "Hi", "--audio", str(clip), "--max-new-tokens", "2",
                    "--stats")
    assert heard.returncode == 0, heard.stderr
    assert re.search(r"audio encode \d+\.\d\d s", heard.stderr) and "image encode" not in heard.stderr


def test_sampling_is_reproducible_with_a_seed(onnx_fp32_bundle):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_new_tokens=12)
    messages = [{"role": "user", "content": "Sample something."}]
    a, b = load(onnx_fp32_bundle), load(onnx_fp32_bundle)
    "".join(a.generate(messages, sampling=params))
    "".join(b.generate(messages, sampling=params))
    assert a.last_token_ids == b.last_token_ids


# --- bad input ---------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(onnx_fp32_bundle, tmp_path) -> Path:
    copy = tmp_path / "copy.edgekit"
    shutil.copytree(onnx_fp32_bundle, copy)
    return copy


def test_tampered_bundle_file_is_named(bundle_copy):
    data = bundle_copy / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    assert_clean_failure(run_cli("run", str(bundle_copy), "-p", "Hi"), contains="decoder.onnx.data")


def test_missing_bundle_file_is_named(bundle_copy):
    (bundle_copy / "embedding.onnx").unlink()
    assert_clean_failure(run_cli("run", str(bundle_copy), "-p", "Hi"), contains="embedding.onnx")


def test_unknown_format_in_manifest(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format"] = "tflite"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_failure(run_cli("run", str(bundle_copy), "-p", "Hi"), contains="tflite")


def test_prompt_past_the_context_names_both_lengths(bundle_copy):
    update_manifest(bundle_copy, max_context=32, prefill_chunk=32)
    result = run_cli("run", str(bundle_copy), "-p", "word " * 40)
    assert_clean_failure(result, code=2)
    assert re.search(r"prompt is \d+ tokens but this bundle's context is 32", result.stderr)


def test_undecodable_image(onnx_fp32_bundle, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    assert_clean_failure(run_cli("run", str(onnx_fp32_bundle), "-p", "Hi", "--image", str(bad)),
                         code=2, contains="broken.png")


@pytest.mark.parametrize("case", ["empty", "silent", "sixty_seconds", "not_wav"])
def test_bad_audio_is_a_one_line_error(onnx_fp32_bundle, tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        _write_wav(path, np.zeros(0))
    elif case == "silent":
        _write_wav(path, np.zeros(16000))
    elif case == "sixty_seconds":
        _write_wav(path, _speechlike(60.0))
    else:
        path.write_text("RIFF? no, just text")
    assert_clean_failure(run_cli("run", str(onnx_fp32_bundle), "-p", "Hi", "--audio", str(path)), code=2)


@pytest.mark.parametrize("rate,channels", [(48000, 1), (16000, 2), (8000, 1)])
def test_other_rates_and_stereo_are_converted(onnx_fp32_bundle, tmp_path, rate, channels):
    mono = _speechlike(1.2, rate)
    samples = np.repeat(mono, channels) if channels == 2 else mono
    path = _write_wav(tmp_path / "in.wav", samples, rate=rate, channels=channels)
    engine = load(onnx_fp32_bundle)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(path)}, {"type": "text", "text": "?"}]}]
    "".join(engine.generate(messages, sampling=SamplingParams(max_new_tokens=2)))
    assert engine.last_stats.audio_seconds == pytest.approx(1.2, abs=0.01)


def test_image_on_a_bundle_without_vision(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["methods"] = [m for m in manifest["methods"] if m["name"] != "vision_encoder"]
    manifest["files"] = [f for f in manifest["files"] if not f["path"].startswith("vision_encoder")]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    for f in bundle_copy.glob("vision_encoder.onnx*"):
        f.unlink()
    engine = load(bundle_copy)
    with pytest.raises(InputError, match="no vision encoder"):
        "".join(engine.generate([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]))


def test_loading_a_non_bundle_directory(tmp_path):
    with pytest.raises(BundleError):
        load(tmp_path)


def test_bench_reports_speed_and_memory(onnx_fp32_bundle):
    result = run_cli("bench", str(onnx_fp32_bundle), "--prompt-tokens", "16", "--decode-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0 and out["peak_rss_mb"] > 0
    table = run_cli("bench", str(onnx_fp32_bundle), "--prompt-tokens", "16", "--decode-tokens", "4",
                    env={"COLUMNS": "100"})
    assert table.returncode == 0, table.stderr
    for row in ("bundle size", "prefill (16 tokens)", "decode (4 tokens)", "peak RSS"):
        assert row in table.stdout
    assert "_" not in table.stdout.replace(onnx_fp32_bundle.name, "")  # no raw key names
    assert_clean_failure(run_cli("bench", str(onnx_fp32_bundle), "--prompt-tokens", "0"), code=2)


@pytest.mark.slow
def test_bench_feeds_an_executorch_prompt_in_chunks_and_checks_the_context(executorch_bundles):
    """A prompt longer than the program's prefill limit goes in the engine's chunks; a
    prompt plus decode steps past the context is a clear error, not a failed kernel."""
    bundle = executorch_bundles["fp32"].path
    manifest = executorch_bundles["fp32"].manifest
    limit = int(manifest.method("text_decoder").extra["max_seq_len"])
    context = int(manifest.max_context)
    result = run_cli("bench", str(bundle), "--prompt-tokens", str(2 * limit + 3), "--decode-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] == 2 * limit + 3
    assert_clean_failure(run_cli("bench", str(bundle), "--prompt-tokens", str(context - 2), "--decode-tokens", "4"),
                         code=2, contains="context")


def test_cache_is_not_reused_across_different_media_of_the_same_length(onnx_fp32_bundle, tmp_path):
    """Soft tokens share one placeholder id: the cache must key them by content."""
    a = _write_wav(tmp_path / "a.wav", _speechlike(1.0))
    b = _write_wav(tmp_path / "b.wav", _speechlike(1.0)[::-1].copy())

    def ask(engine, clip):
        messages = [{"role": "user", "content": [{"type": "audio", "audio": str(clip)},
                                                 {"type": "text", "text": "What was said?"}]}]
        "".join(engine.generate(messages, sampling=SamplingParams(max_new_tokens=6)))
        return list(engine.last_token_ids), engine.last_stats

    engine = load(onnx_fp32_bundle)
    ask(engine, a)
    tokens_b, stats_b = ask(engine, b)
    clip_start = next(i for i, key in enumerate(engine._cached_ids) if isinstance(key, tuple))
    assert 0 < stats_b.prompt_tokens - stats_b.prefilled_tokens <= clip_start  # reused up to the clip only
    assert tokens_b == ask(load(onnx_fp32_bundle), b)[0]


def test_chat_encodes_each_clip_once(onnx_fp32_bundle, tmp_path):
    """Every turn re-sends the conversation's media; the encoder runs once per clip, and the
    answer is a fresh session's."""
    clip = _write_wav(tmp_path / "a.wav", _speechlike(1.0))
    engine = load(onnx_fp32_bundle)
    encode, calls = engine.backend.encode_audio, []
    engine.backend.encode_audio = lambda *args: calls.append(1) or encode(*args)
    history = [{"role": "user", "content": [{"type": "audio", "audio": str(clip)},
                                            {"type": "text", "text": "What was said?"}]}]
    history += [{"role": "assistant", "content": "".join(engine.generate(history, sampling=GREEDY))},
                {"role": "user", "content": "Say it again."}]
    second = "".join(engine.generate(history, sampling=GREEDY))
    assert len(calls) == 1 and engine.last_stats.audio_seconds == pytest.approx(1.0, abs=0.01)
    assert second == "".join(load(onnx_fp32_bundle).generate(history, sampling=GREEDY))


def test_chunked_prefill_gives_the_same_answer(onnx_fp32_bundle):
    messages = [{"role": "user", "content": "A longer prompt, so that it spans several prefill chunks."}]
    whole, chunked = load(onnx_fp32_bundle), load(onnx_fp32_bundle)
    chunked.prefill_chunk = 5
    "".join(whole.generate(messages, sampling=GREEDY))
    "".join(chunked.generate(messages, sampling=GREEDY))
    assert chunked.last_token_ids == whole.last_token_ids
