"""CPU unit tests + parity with transformers' Gemma 4 processor.

edgekit.runtimes.prompt renders the chat template with plain jinja2, tokenizes with the
`tokenizers` library and expands image / audio placeholders; its ids, soft-token spans and
rendered text are compared with transformers' Gemma4Processor for a tiny random-weight
checkpoint (text, system + multi-turn, thinking, images of several sizes, a 1.3 s clip,
images and audio in one turn). The jinja environment is compared with transformers' own
renderer on a template that uses its globals. Sampling (greedy, temperature, top-k, top-p,
seeds, empirical distribution) and streaming detokenization (byte-fallback Japanese and
emoji, special tokens) are plain unit tests; a subprocess proves the three modules import
with torch and transformers unimportable. Fast (well under 30 s, most of it the fixture).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.errors import BundleError, InputError
from edgekit.manifest import SpecialTokens
from edgekit.runtimes.image_preprocess import ImageParams, num_soft_tokens
from edgekit.runtimes.mel_features import MelParams, num_audio_tokens
from edgekit.runtimes.prompt import ChatTemplate, PromptBuilder, prompt_pieces, prompt_segments, special_tokens_map
from edgekit.runtimes.sampling import Sampler, SamplingParams, filter_candidates
from edgekit.runtimes.text_stream import ChannelStreamer, TextStreamer

ROOT = Path(__file__).resolve().parent.parent
RATE = 16_000


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder(tiny_e2b) -> PromptBuilder:
    return PromptBuilder.from_dir(tiny_e2b)


@pytest.fixture(scope="module")
def reference(tiny_e2b):
    from edgekit.models.gemma4.processor_files import load_reference_processor

    return load_reference_processor(tiny_e2b)


@pytest.fixture(scope="module")
def media_params(tiny_e2b) -> tuple[ImageParams, MelParams]:
    cfg = json.loads((tiny_e2b / "processor_config.json").read_text())
    return ImageParams.from_dict(cfg["image_processor"]), MelParams.from_dict(cfg["feature_extractor"])


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * RATE)))).astype(np.float32)


# --- prompt parity -------------------------------------------------------------------------

TEXT = [{"role": "user", "content": "Where is the train station?"}]
MULTI_TURN = [
    {"role": "system", "content": "You translate English into Japanese."},
    {"role": "user", "content": "Good morning."},
    {"role": "assistant", "content": "<|channel>thought\nEasy.<channel|>おはようございます。"},
    {"role": "user", "content": [{"type": "text", "text": "Thank you very much for your help."}]},
]


def _parity(builder, reference, messages, *, images=(), audio=(), enable_thinking=False, media_params=None):
    """Our Prompt and the processor's input_ids / mm_token_type_ids for the same messages."""
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    # add_special_tokens=False: the template writes <bos> (apply_chat_template(tokenize=True) does the same).
    ref = reference(text=text, images=list(images) or None, audio=list(audio) or None, add_special_tokens=False)
    image_params, mel_params = media_params or (None, None)
    prompt = builder.build(
        messages, enable_thinking=enable_thinking,
        image_soft_tokens=[num_soft_tokens(im.height, im.width, params=image_params) for im in images],
        audio_soft_tokens=[num_audio_tokens(len(a), params=mel_params) for a in audio],
    )
    assert prompt.text == text
    ref_ids = np.asarray(ref["input_ids"][0], dtype=np.int64)
    np.testing.assert_array_equal(prompt.input_ids, ref_ids)
    assert prompt.input_ids.dtype == np.int64 and prompt.ple_ids.dtype == np.int64

    # Spans cover exactly the tokens the processor marks as image (1) / audio (3) soft tokens.
    types = np.asarray(ref["mm_token_type_ids"][0])
    for spans, kind in ((prompt.image_spans, 1), (prompt.audio_spans, 3)):
        marked = np.zeros(len(prompt), dtype=bool)
        for span in spans:
            marked[span.start:span.stop] = True
        np.testing.assert_array_equal(marked, types == kind)
    st = builder.special_tokens
    np.testing.assert_array_equal(prompt.ple_ids, np.where(types > 0, st.pad_id, ref_ids))
    return prompt, ref


def test_text_only(builder, reference):
    prompt, _ = _parity(builder, reference, TEXT)
    assert prompt.image_spans == () and prompt.audio_spans == ()
    np.testing.assert_array_equal(prompt.ple_ids, prompt.input_ids)
    # The processor's one-call path (apply_chat_template(tokenize=True)) agrees too.
    ids = reference.apply_chat_template(TEXT, tokenize=True, add_generation_prompt=True, return_tensors=None)
    np.testing.assert_array_equal(prompt.input_ids, np.asarray(ids).reshape(-1))


def test_system_and_multi_turn(builder, reference):
    prompt, _ = _parity(builder, reference, MULTI_TURN)
    assert "Easy." not in prompt.text  # thinking is stripped from model turns in history
    assert prompt.text.startswith("<bos><|turn>system\nYou translate")


def test_thinking_on(builder, reference):
    on, _ = _parity(builder, reference, TEXT, enable_thinking=True)
    off = builder.build(TEXT)
    assert "<|think|>" in on.text and "<|think|>" not in off.text
    assert on.text.endswith("<|turn>model\n") and off.text.endswith("<|channel>thought\n<channel|>")


@pytest.mark.parametrize("size", [(640, 480), (1000, 1000), (48, 900), (33, 21)])
def test_one_image(builder, reference, media_params, size):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    image = _image(*size)
    prompt, _ = _parity(builder, reference, messages, images=[image], media_params=media_params)
    (span,) = prompt.image_spans
    st = builder.special_tokens
    assert prompt.input_ids[span.start - 1] == st.boi_id and prompt.input_ids[span.stop] == st.eoi_id
    assert len(span) == num_soft_tokens(size[1], size[0], params=media_params[0])


def test_image_sizes_give_different_counts(media_params):
    counts = {num_soft_tokens(h, w, params=media_params[0]) for w, h in [(640, 480), (1000, 1000), (48, 900), (33, 21)]}
    assert len(counts) >= 3, counts


def test_one_audio_clip(builder, reference, media_params):
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe."}]}]
    clip = _clip(1.3)
    prompt, _ = _parity(builder, reference, messages, audio=[clip], media_params=media_params)
    (span,) = prompt.audio_spans
    assert len(span) == 33  # 1.3 s at 40 ms per token, rounded up
    st = builder.special_tokens
    assert prompt.input_ids[span.start - 1] == st.boa_id and prompt.input_ids[span.stop] == st.eoa_id


def test_images_and_audio_in_one_turn(builder, reference, media_params):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Compare this"},
            {"type": "audio"}, {"type": "text", "text": " with this picture"}, {"type": "image"},
        ]},
    ]
    images, audio = [_image(640, 480, 1), _image(200, 300, 2)], [_clip(1.3, 3)]
    prompt, _ = _parity(builder, reference, messages, images=images, audio=audio, media_params=media_params)
    assert len(prompt.image_spans) == 2 and len(prompt.audio_spans) == 1
    # In prompt order: image, audio, image.
    assert prompt.image_spans[0].stop < prompt.audio_spans[0].start < prompt.image_spans[1].start


def test_placeholder_count_mismatch(builder):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match="1 image placeholder"):
        builder.build(messages)
    with pytest.raises(InputError, match="audio"):
        builder.build(TEXT, audio_soft_tokens=[10])
    with pytest.raises(InputError, match="non-negative"):
        builder.build(messages, image_soft_tokens=[-1])
    with pytest.raises(InputError, match="video"):
        builder.build([{"role": "user", "content": [{"type": "video"}]}])


def test_manifest_tokens_must_match_tokenizer(tiny_e2b, builder):
    st = builder.special_tokens
    wrong = SpecialTokens(bos_id=st.bos_id, eos_ids=st.eos_ids, pad_id=st.pad_id, image_token_id=st.image_token_id + 1)
    with pytest.raises(BundleError, match="<\\|image\\|>"):
        PromptBuilder.from_dir(tiny_e2b, special_tokens=wrong)


def test_prompt_pieces_give_the_runners_ids(builder):
    """An app's prompt from the manifest's pieces (android_demo) is the ids the runner builds:
    text tokenized piece by piece, each image or clip its soft tokens, across turns."""
    pieces = prompt_pieces(builder)
    assert pieces is not None and pieces.begin == "<bos>" and pieces.image_start == "<|image>"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Compare this "},
                                     {"type": "audio"}, {"type": "text", "text": "with this.\n"}]},
        {"role": "assistant", "content": "A cat and a bell."},
        {"role": "user", "content": "  And now? "},
    ]
    st, ids = builder.special_tokens, []
    for segment in prompt_segments(pieces, messages):
        if isinstance(segment, str):
            ids += builder.tokenizer.encode(segment, add_special_tokens=False).ids
        else:
            ids += [st.image_token_id] * 3 if segment[0] == "image" else [st.audio_token_id] * 2
    expected = builder.build(messages, image_soft_tokens=[3], audio_soft_tokens=[2]).input_ids
    assert ids == expected.tolist()
    with pytest.raises(InputError, match="'system'"):
        prompt_segments(pieces, [{"role": "system", "content": "Be brief."}])


def test_prompt_pieces_refuse_a_template_they_cannot_describe(builder):
    other = PromptBuilder(template=ChatTemplate("{{ messages | length }}"), tokenizer=builder.tokenizer,
                          special_tokens=builder.special_tokens)
    assert prompt_pieces(other) is None


_ENV_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
  {% if loop.index > 3 %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% generation %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endgeneration %}
{% endfor %}
{{ ns.n }}{{ dict(a=1) | tojson }}{% if add_generation_prompt %}{{ eos_token }}{% endif %}
"""


def test_environment_matches_transformers(tiny_e2b):
    from transformers.utils.chat_template_utils import render_jinja_template

    config = json.loads((tiny_e2b / "tokenizer_config.json").read_text())
    variables = special_tokens_map(config)
    template = ChatTemplate(_ENV_TEMPLATE, special_tokens=variables)
    messages = [{"role": "user", "content": "<b>ü & 日本</b>"}, {"role": "assistant", "content": [{"type": "text",
                "text": "x"}, {"type": "image", "image": _image(4, 4)}]}] * 3
    (expected,), _ = render_jinja_template(conversations=[messages], chat_template=_ENV_TEMPLATE,
                                           add_generation_prompt=True, **variables)
    assert template.render(messages) == expected
    with pytest.raises(InputError, match="no tools here"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(BundleError, match="syntax error"):
        ChatTemplate("{% if %}")


def test_template_variables_from_tokenizer_config(tiny_e2b, reference):
    config = json.loads((tiny_e2b / "tokenizer_config.json").read_text())
    assert special_tokens_map(config) == reference.tokenizer.special_tokens_map


# --- sampling ------------------------------------------------------------------------------


def _logits(v: int = 1000, seed: int = 0) -> np.ndarray:
    return (3.0 * np.random.default_rng(seed).standard_normal(v)).astype(np.float32)


def test_params_validation():
    for bad in [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_p=float("nan")), dict(top_k=-1), dict(top_k=2.5), dict(max_new_tokens=0),
                dict(seed=-3), dict(repetition_penalty=0.0)]:
        with pytest.raises(InputError):
            SamplingParams(**bad)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams())
    for seed in range(20):
        x = _logits(seed=seed)
        assert sampler.next_token(x) == int(np.argmax(x))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 7.5])
def test_top_k_1_is_greedy(temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=1))
    for seed in range(20):
        x = _logits(seed=seed)
        assert sampler.next_token(x) == int(np.argmax(x))


@pytest.mark.parametrize("top_p", [1.0, 0.95])
def test_a_temperature_too_small_to_scale_by_is_greedy(top_p):
    """1e-40 overflows float32 logits when dividing: the sampler takes the limit, argmax."""
    logits = np.array([0.5, 3.0, -1.0, 2.9], np.float32)
    sampler = Sampler(SamplingParams(temperature=1e-40, top_p=top_p, seed=0))
    assert [sampler.next_token(logits) for _ in range(5)] == [1] * 5


def test_tiny_top_p_is_greedy():
    sampler = Sampler(SamplingParams(temperature=2.0, top_p=1e-6, seed=2))
    for seed in range(20):
        x = _logits(seed=seed)
        assert sampler.next_token(x) == int(np.argmax(x))


def test_seed_reproducible():
    params = SamplingParams(temperature=1.3, top_k=50, top_p=0.9, seed=1234)
    xs = [_logits(seed=s) for s in range(50)]
    s1, s2 = Sampler(params), Sampler(params)
    run1, run2 = [s1.next_token(x) for x in xs], [s2.next_token(x) for x in xs]
    assert run1 == run2
    other = Sampler(SamplingParams(temperature=1.3, top_k=50, top_p=0.9, seed=4321))
    assert [other.next_token(x) for x in xs] != run1


def test_empirical_distribution_matches_softmax():
    x = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    n = 20_000
    counts = np.bincount([sampler.next_token(x) for _ in range(n)], minlength=len(x))
    # Five standard errors per bin: a false failure is (far) rarer than 1 in 10^5.
    assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-4), (counts / n, p)


def test_filtered_tokens_never_drawn():
    x = _logits(200, seed=3)
    order = np.argsort(-x, kind="stable")
    top_k = Sampler(SamplingParams(temperature=5.0, top_k=5, seed=0))
    drawn = {top_k.next_token(x) for _ in range(3000)}
    assert drawn <= set(order[:5].tolist()) and len(drawn) == 5

    # top-p keeps the smallest most-likely set whose mass reaches p (TopPLogitsWarper).
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, 0.8)) + 1]
    np.testing.assert_array_equal(np.sort(filter_candidates(x, top_k=0, top_p=0.8)), np.sort(keep))
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert {top_p.next_token(x) for _ in range(3000)} <= set(keep.tolist())

    masked = x.copy()
    masked[order[0]] = -np.inf  # e.g. a token the runner forbids
    s = Sampler(SamplingParams(temperature=100.0, seed=0))
    assert all(s.next_token(masked) != order[0] for _ in range(2000))


def test_top_p_prefix_search_equals_full_sort():
    # filter_candidates sorts only a growing prefix; it must keep what a full sort keeps.
    rng = np.random.default_rng(5)
    for trial in range(200):
        v = int(rng.integers(2, 3000))
        x = (rng.standard_normal(v) * rng.uniform(0.1, 20)).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x)  # many ties
        p = float(rng.uniform(0.01, 0.999))
        order = np.argsort(-x, kind="stable")
        probs = np.exp(x[order].astype(np.float64) - x.max())
        probs /= probs.sum()
        expected = order[np.cumsum(probs) - probs < p]
        np.testing.assert_array_equal(filter_candidates(x, top_k=0, top_p=p), expected)


def test_top_k_keeps_ties_like_transformers():
    x = np.array([1.0, 3.0, 2.0, 2.0, 0.0], dtype=np.float32)
    assert sorted(filter_candidates(x, top_k=2, top_p=1.0).tolist()) == [1, 2, 3]


def test_repetition_penalty():
    x = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=1.5))
    assert sampler.next_token(x) == 0
    assert sampler.next_token(x, seen_ids=[0, 0, 7]) == 1  # 2.0 / 1.5 < 1.9; id 7 is out of range, ignored


# --- streaming detokenization --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(builder):
    return builder.tokenizer


def _stream(tokenizer, ids, **kw) -> list[str]:
    streamer = TextStreamer(tokenizer, **kw)
    pieces = [streamer.push(i) for i in ids]
    return pieces + [streamer.flush()]


@pytest.mark.parametrize("text", [
    "鬱蒼とした森で薔薇を見つけました。",  # kanji outside the tiny vocabulary: byte fallback
    "Party time 🎉🎉 👍🏽 done!",
    "  leading spaces, おはよう 🙂\nnew line ",
])
def test_stream_byte_fallback(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids), "text should need byte fallback"
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 3  # streamed as it goes, not all at the end
    assert pieces[-1] == ""  # nothing held back once the text is complete


def test_stream_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<bos><|turn>model\nこんにちは 👋<turn|>\n", add_special_tokens=False).ids
    skipped = _stream(tokenizer, ids)
    assert "".join(skipped) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<turn|>" not in "".join(skipped) and "こんにちは 👋" in "".join(skipped)
    kept = _stream(tokenizer, ids, skip_special=False)
    assert "".join(kept) == tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(kept).startswith("<bos><|turn>model")


def test_thinking_streams_apart_from_the_answer(tokenizer):
    """`<|channel>thought\n...<channel|>answer`: the thought without the markers and the
    channel's name, the answer alone; each concatenates to its own decode."""
    ids = tokenizer.encode("<|channel>thought\nhmm, こんにちは?<channel|>Hello 👋", add_special_tokens=False).ids
    streamer = ChannelStreamer(tokenizer, open_id=tokenizer.token_to_id("<|channel>"),
                               close_id=tokenizer.token_to_id("<channel|>"))
    pushed = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(t for t, _ in pushed) == "hmm, こんにちは?"
    assert "".join(a for _, a in pushed) == "Hello 👋"
    # Without thinking, the channel arrives empty in the prompt and the answer is all there is.
    plain = ChannelStreamer(tokenizer, open_id=tokenizer.token_to_id("<|channel>"),
                            close_id=tokenizer.token_to_id("<channel|>"))
    pushed = [plain.push(i) for i in tokenizer.encode("Hello 👋", add_special_tokens=False).ids] + [plain.flush()]
    assert [t for t, _ in pushed] == [""] * len(pushed) and "".join(a for _, a in pushed) == "Hello 👋"


def test_stream_holds_incomplete_bytes(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False).ids
    assert len(ids) == 4  # four byte tokens
    streamer = TextStreamer(tokenizer)
    assert [streamer.push(i) for i in ids] == ["", "", "", "🎉"]
    truncated = TextStreamer(tokenizer)
    assert [truncated.push(i) for i in ids[:2]] == ["", ""]
    assert truncated.flush() == tokenizer.decode(ids[:2])  # what decode shows for a cut-off character


# --- device side: no torch, no transformers ------------------------------------------------

_TORCH_FREE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked on the device side")
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from edgekit.runtimes import prompt, sampling, text_stream
builder = prompt.PromptBuilder.from_dir(sys.argv[1])
p = builder.build([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                  image_soft_tokens=[3])
assert len(p.image_spans[0]) == 3
s = sampling.Sampler(sampling.SamplingParams(temperature=0.8, top_k=5, seed=0))
s.next_token(np.zeros(10, np.float32))
assert text_stream.TextStreamer(builder.tokenizer).push(p.input_ids[-1]) is not None
assert not any(m.partition(".")[0] in ("torch", "transformers") for m in sys.modules)
print("torch-free")
"""


def test_runtime_modules_import_without_torch(tiny_e2b):
    result = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(tiny_e2b)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch-free"
