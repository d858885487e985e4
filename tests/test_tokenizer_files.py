"""CPU unit tests: the tokenizer, chat template and processor files of a random-weight checkpoint.

A small real tokenizer is written for the tiny vocabulary (4096) and the released one
(262144); both must place every special token at its layout id, round-trip any text,
be byte-for-byte reproducible, and load offline in transformers. The chat template must
render the same text in plain jinja2 (the device runner) and in transformers. The
processor_config.json must load back into transformers' Gemma 4 feature extractor,
image processor and processor with transformers' own default values.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np
import pytest
from tokenizers import Tokenizer

from edgekit.models.gemma4.presets import PRESETS, build_config
from edgekit.models.gemma4.processor_files import load_reference_processor, processor_config, write_processor_files
from edgekit.models.gemma4.special_tokens import TOKEN_STRINGS, layout_for
from edgekit.testing.tokenizer_builder import CHAT_TEMPLATE_PATH, write_tokenizer_files

VOCAB_SIZES = [4096, 262_144]
ROUND_TRIP_TEXTS = [
    "The train to the airport leaves in ten minutes.",
    "駅はどこですか？ 空港行きの電車は三番線から出発します。",
    "Emoji survive through byte fallback: 🚀🎧 👍🏽",
    "  leading spaces, double  spaces,\ttabs and\nnew lines\n",
    "¿Dónde está la estación? Übersetzung, ça coûte, Ελληνικά, עברית, 中文",
    "Hi <|image|> and <|audio|> inline, then <turn|>\n",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[int, Path]:
    dirs = {}
    for vocab_size in VOCAB_SIZES:
        out = tmp_path_factory.mktemp(f"tok{vocab_size}")
        write_tokenizer_files(out, layout=layout_for(vocab_size))
        dirs[vocab_size] = out
    return dirs


@pytest.fixture(scope="module")
def hf_tokenizers(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {v: AutoTokenizer.from_pretrained(d, local_files_only=True) for v, d in tokenizer_dirs.items()}


# --- tokenizer.json ---------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_vocab_has_exact_size_bytes_and_unused_fill(tokenizer_dirs, vocab_size):
    out = tokenizer_dirs[vocab_size]
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    model = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] and model["unk_token"] == "<unk>"
    vocab = model["vocab"]
    assert len(vocab) == vocab_size
    assert sorted(vocab.values()) == list(range(vocab_size))
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    assert "<unused0>" in vocab and len(model["merges"]) > 100
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True) == vocab_size


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_special_tokens_sit_at_layout_ids_and_encode_whole(tokenizer_dirs, vocab_size):
    layout = layout_for(vocab_size)
    tok = Tokenizer.from_file(str(tokenizer_dirs[vocab_size] / "tokenizer.json"))
    for role, i in layout.ids.items():
        text = TOKEN_STRINGS[role]
        assert tok.token_to_id(text) == i, role
        assert tok.encode(text, add_special_tokens=False).ids == [i], role
        assert i in tok.encode(f"a {text}b", add_special_tokens=False).ids, role
    if vocab_size == 262_144:  # the released ids (transformers Gemma4Config defaults)
        assert [tok.token_to_id(s) for s in ("<|image|>", "<|audio|>", "<|image>", "<|audio>", "<|turn>")] == [
            258_880, 258_881, 255_999, 256_000, 105]


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_text_round_trips_the_same_on_device_and_in_transformers(tokenizer_dirs, hf_tokenizers, vocab_size):
    tok = Tokenizer.from_file(str(tokenizer_dirs[vocab_size] / "tokenizer.json"))
    hf = hf_tokenizers[vocab_size]
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert hf(text, add_special_tokens=False).input_ids == ids
        assert hf.decode(ids) == text
    assert any(t.startswith("<0x") for t in tok.encode("🚀", add_special_tokens=False).tokens)
    # Real pieces, not one token per character.
    assert len(tok.encode(ROUND_TRIP_TEXTS[0], add_special_tokens=False).ids) < len(ROUND_TRIP_TEXTS[0]) // 2
    # add_bos_token: exactly one <bos> in front when special tokens are added.
    assert hf("hello").input_ids == [hf.bos_token_id] + hf("hello", add_special_tokens=False).input_ids


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_files_are_deterministic_and_fast(tokenizer_dirs, tmp_path, vocab_size):
    start = time.perf_counter()
    write_tokenizer_files(tmp_path, layout=layout_for(vocab_size))
    assert time.perf_counter() - start < 5.0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dirs[vocab_size] / name).read_bytes(), name


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_transformers_loads_gemma_tokenizer_with_multimodal_attributes(hf_tokenizers, vocab_size):
    layout = layout_for(vocab_size)
    hf = hf_tokenizers[vocab_size]
    assert type(hf).__name__ == "GemmaTokenizer"
    assert len(hf) == vocab_size and hf.padding_side == "left"
    for role in ("pad_token", "eos_token", "bos_token", "unk_token", "mask_token"):
        assert getattr(hf, role) == TOKEN_STRINGS[role]
        assert getattr(hf, f"{role}_id") == layout.id(role)
    # The attributes Gemma4Processor reads.
    for role in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token",
                 "sot_token", "eot_token", "soc_token", "eoc_token", "think_token"):
        assert getattr(hf, role) == TOKEN_STRINGS[role], role
        assert hf.convert_tokens_to_ids(getattr(hf, role)) == layout.id(role), role
    assert hf.image_token_id == layout.id("image_token") and hf.audio_token_id == layout.id("audio_token")


# --- chat template ----------------------------------------------------------------------
SINGLE = [{"role": "user", "content": "Translate into Spanish: good morning"}]
MULTI = [
    {"role": "system", "content": "  You are a translator.  "},
    {"role": "user", "content": "Good morning"},
    {"role": "assistant", "content": "<|channel>thought\nGreeting.<channel|>Buenos días"},
    {"role": "user", "content": "And thank you?"},
]
MEDIA = [{"role": "user", "content": [
    {"type": "image", "url": "photo.jpg"},
    {"type": "audio", "path": "speech.wav"},
    {"type": "text", "text": "Transcribe the audio, then describe the image. "},
]}]
CASES = {
    "single": (SINGLE, {}, "<bos><|turn>user\nTranslate into Spanish: good morning<turn|>\n"
                           "<|turn>model\n<|channel>thought\n<channel|>"),
    "system_multi_turn": (MULTI, {}, "<bos><|turn>system\nYou are a translator.<turn|>\n"
                                     "<|turn>user\nGood morning<turn|>\n<|turn>model\nBuenos días<turn|>\n"
                                     "<|turn>user\nAnd thank you?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"),
    "thinking_on": (SINGLE, {"enable_thinking": True},
                    "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nTranslate into Spanish: good morning<turn|>\n"
                    "<|turn>model\n"),
    "thinking_on_with_system": (MULTI[:2], {"enable_thinking": True},
                                "<bos><|turn>system\n<|think|>\nYou are a translator.<turn|>\n"
                                "<|turn>user\nGood morning<turn|>\n<|turn>model\n"),
    "thinking_off": (SINGLE, {"enable_thinking": False}, None),
    "media_items": (MEDIA, {}, "<bos><|turn>user\n<|image|><|audio|>Transcribe the audio, then describe the image."
                               "<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"),
    "no_generation_prompt": (MULTI[:3], {"add_generation_prompt": False},
                             "<bos><|turn>system\nYou are a translator.<turn|>\n<|turn>user\nGood morning<turn|>\n"
                             "<|turn>model\nBuenos días<turn|>\n"),
}


def _render_plain(messages, **kwargs) -> str:
    """What the device runner does: jinja2 alone, no transformers."""
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    return jinja2.Environment().from_string(template).render(messages=messages, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_chat_template_renders_the_same_in_jinja2_and_transformers(hf_tokenizers, case):
    messages, kwargs, expected = CASES[case]
    kwargs = {"add_generation_prompt": True, **kwargs}
    hf = hf_tokenizers[4096]
    rendered = _render_plain(messages, **kwargs)
    assert hf.apply_chat_template(messages, tokenize=False, **kwargs) == rendered
    # transformers' own environment settings, in a sandbox, without transformers.
    sandbox = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    assert sandbox.from_string(CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")).render(
        messages=messages, **kwargs) == rendered
    if expected is not None:
        assert rendered == expected
    if case == "thinking_off":
        assert rendered == CASES["single"][2]
    # Tokenized: exactly one <bos>, and the same ids as the raw tokenizer on the text.
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    assert ids.count(hf.bos_token_id) == 1 and ids[0] == hf.bos_token_id
    assert ids == hf(rendered, add_special_tokens=False).input_ids


def test_chat_template_file_is_the_preset(tokenizer_dirs):
    assert (tokenizer_dirs[4096] / "chat_template.jinja").read_bytes() == CHAT_TEMPLATE_PATH.read_bytes()


# --- processor files ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_like_dir(tmp_path_factory, tokenizer_dirs) -> Path:
    """Tokenizer + processor files of tiny-e2b, as make_checkpoint writes them."""
    out = tmp_path_factory.mktemp("proc")
    config = build_config(PRESETS["tiny-e2b"])
    write_tokenizer_files(out, layout=layout_for(config["text_config"]["vocab_size"]))
    write_processor_files(out, config=config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_processor_config_takes_sizes_from_vision_config():
    config = build_config(PRESETS["e2b-shape"], layers=2)
    config["vision_config"] = {**config["vision_config"], "patch_size": 14, "pooling_kernel_size": 2}
    cfg = processor_config(config)
    for section in ("image_processor", "video_processor"):
        assert (cfg[section]["patch_size"], cfg[section]["pooling_kernel_size"]) == (14, 2)
    assert cfg["processor_class"] == "Gemma4Processor"
    assert (cfg["image_seq_length"], cfg["audio_seq_length"], cfg["audio_ms_per_token"]) == (280, 750, 40)


def test_feature_extractor_and_image_processor_load_with_transformers_defaults(checkpoint_like_dir):
    import transformers
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    names = {p.name for p in checkpoint_like_dir.iterdir()}
    assert "processor_config.json" in names and "preprocessor_config.json" not in names

    fe = transformers.AutoFeatureExtractor.from_pretrained(checkpoint_like_dir, local_files_only=True)
    assert type(fe).__name__ == "Gemma4AudioFeatureExtractor"
    assert fe.to_dict() == transformers.Gemma4AudioFeatureExtractor().to_dict()
    assert (fe.sampling_rate, fe.feature_size, fe.frame_length, fe.hop_length) == (16_000, 128, 320, 160)
    assert transformers.Gemma4AudioFeatureExtractor.from_pretrained(checkpoint_like_dir).to_dict() == fe.to_dict()

    ip = transformers.AutoImageProcessor.from_pretrained(checkpoint_like_dir, local_files_only=True)
    assert isinstance(ip, (Gemma4ImageProcessorPil, getattr(transformers, "Gemma4ImageProcessor", ())))
    default = Gemma4ImageProcessorPil()
    for key in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "resample", "rescale_factor",
                "max_soft_tokens", "patch_size", "pooling_kernel_size"):
        assert getattr(ip, key) == getattr(default, key), key
    assert list(ip.image_mean) == list(default.image_mean) and list(ip.image_std) == list(default.image_std)
    assert Gemma4ImageProcessorPil.from_pretrained(checkpoint_like_dir).patch_size == 16


def test_reference_processor_handles_text_image_and_audio(checkpoint_like_dir):
    from PIL import Image

    processor = load_reference_processor(checkpoint_like_dir)
    tok = processor.tokenizer
    layout = layout_for(4096)
    assert (processor.image_token_id, processor.audio_token_id) == (layout.id("image_token"), layout.id("audio_token"))
    assert processor.video_token_id == layout.id("video_token") and len(tok) == 4096  # no token added

    text = processor.apply_chat_template(MEDIA, add_generation_prompt=True, tokenize=False)
    assert text == CASES["media_items"][2]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 144, 3), dtype=np.uint8))
    audio = np.random.default_rng(1).standard_normal(16_000).astype(np.float32) * 0.1  # 1 s
    out = processor(text=text, images=[image], audio=[audio], add_special_tokens=False, return_tensors="np")
    ids = out["input_ids"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1
    expected = processor._get_num_multimodal_tokens(image_sizes=[[96, 144]], audio_lengths=[16_000])
    assert ids.count(layout.id("image_token")) == expected.num_image_tokens[0] > 0
    assert ids.count(layout.id("audio_token")) == expected.num_audio_tokens[0] == 1000 // 40  # 40 ms a token
    assert ids.count(layout.id("boi_token")) == 1 and ids.count(layout.id("boa_token")) == 1
    assert out["input_features"].shape[-1] == 128
