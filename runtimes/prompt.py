r"""Chat messages -> the token ids a Gemma 4 bundle is prefilled with (no torch, no transformers).

    messages ──ChatTemplate.render──► "<bos><|turn>user\n<|image|>What is this?<turn|>\n<|turn>model\n..."
             ──tokenizers.encode────► [2, 105, ..., IMG, ...]             (add_special_tokens=False:
                                                                            the template writes <bos>)
             ──expand placeholders──► [2, 105, ..., BOI, IMG x n, EOI, ...]
                                       image_spans[0] = range(first IMG, last IMG + 1)

The template is rendered the way transformers renders chat templates
(transformers/utils/chat_template_utils.py `_cached_compile_jinja_template` and
`render_jinja_template`, v5.23): an ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, loop controls, the `raise_exception` / `strftime_now` / `dict` / `namespace`
globals, its `tojson` filter, inputs rebuilt from plain JSON types, and the tokenizer's
special-token strings (`bos_token`, `image_token`, ...) passed as variables.

Expansion mirrors Gemma4Processor (transformers/models/gemma4/processing_gemma4.py):
`replace_image_token` turns the i-th "<|image|>" into boi + image_token * n + eoi and
`replace_audio_token` the i-th "<|audio|>" into boa + audio_token * n + eoa. transformers
does it on the text and then tokenizes; every piece involved is a special added token, so
the tokenizer splits the text at the same places and expanding the ids instead gives the
same ids (tests/test_prompt_sampling.py checks it against the processor). The counts come
from image_preprocess.num_soft_tokens and mel_features.num_audio_tokens.

`ple_ids` mirrors Gemma4Model.forward: image, video and audio token ids become the pad id
before the embedding and per-layer-embedding lookups.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Union

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edgekit.errors import BundleError, InputError
from edgekit.manifest import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, PromptPieces, SpecialTokens
from edgekit.models.gemma4.special_tokens import TOKEN_STRINGS

Message = Mapping[str, Any]  # {"role": ..., "content": str | [{"type": "text"|"image"|"audio", ...}]}


# --- template ------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' AssistantTracker marks assistant
    text with it; rendering only needs the body, so templates using it still load."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes, as transformers' TemplateNamespace does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _TemplateDict:
    # dict() for templates without exposing the dict type itself (transformers' TemplateDict).
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers overrides jinja's tojson, which would HTML-escape '<' and '>'.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """What the template may see: plain JSON types; images, arrays, ... become "<TypeName>".

    transformers' `_plain_template_data`: message parts may carry a PIL image or a waveform,
    whose methods the sandbox does not know to be unsafe; templates only test for the keys.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _check_text(value: Any, where: str) -> None:
    """Text must be valid Unicode: bytes that are not UTF-8 (a shell passes them through as
    surrogates) would reach the tokenizer as a string it cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{where} is not valid UTF-8 text") from None
    elif isinstance(value, Mapping):
        for v in value.values():
            _check_text(v, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(v, where)


# transformers passes a message's reasoning under all these names (`_alias_reasoning_fields`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts; "
                         f"got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'; got {message!r:.80}")
        # The processor drops None-valued keys (OpenAI-style content=None) before rendering.
        plain = _plain({k: v for k, v in message.items() if v is not None})
        _check_text(plain, f"message {i}")
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def special_tokens_map(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """Template variables from tokenizer_config.json, as transformers' `special_tokens_map`:
    the named special tokens (bos_token, ...) and the `extra_special_tokens` roles."""
    def content(v: Any) -> str | None:  # a plain string, or a serialized AddedToken
        return v.get("content") if isinstance(v, Mapping) else v if isinstance(v, str) else None

    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    out = {k: content(tokenizer_config.get(k)) for k in names}
    extra = tokenizer_config.get("extra_special_tokens") or {}
    if isinstance(extra, Mapping):
        out.update({k: content(v) for k, v in extra.items()})
    return {k: v for k, v in out.items() if v is not None}


class ChatTemplate:
    """A bundle's chat_template.jinja, rendered as transformers' apply_chat_template renders it."""

    def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None,
                 name: str = "chat template") -> None:
        self.source = source
        self.name = name
        # Without a tokenizer_config.json, Gemma 4's own roles stand in (edgekit.models.gemma4.special_tokens).
        self.special_tokens = dict(special_tokens) if special_tokens is not None else {
            k: v for k, v in TOKEN_STRINGS.items() if k != "video_token"}
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise BundleError(f"{name} has a syntax error at line {exc.lineno}: {exc.message}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *,
                  special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """Load chat_template.jinja; special-token variables from the tokenizer_config.json
        beside it unless given."""
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BundleError(f"cannot read chat template {path}: {exc.strerror or exc}") from None
        if special_tokens is None and (path.parent / TOKENIZER_CONFIG_FILE).is_file():
            try:
                config = json.loads((path.parent / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise BundleError(f"cannot read {path.parent / TOKENIZER_CONFIG_FILE}: {exc}") from None
            special_tokens = special_tokens_map(config if isinstance(config, dict) else {})
        return cls(source, special_tokens=special_tokens, name=str(path))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               enable_thinking: bool = False) -> str:
        chat = _normalize_messages(messages)
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) in the template
            raise InputError(f"{self.name} rejected the messages: {exc.message or exc}") from None


# --- prompt --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prompt:
    """Everything prefill needs. Arrays are read-only int64 [num_tokens]."""

    input_ids: np.ndarray
    ple_ids: np.ndarray  # input_ids with image/audio/video soft tokens -> pad id (per-layer embeddings)
    image_spans: tuple[range, ...]  # positions of each image's soft tokens, in prompt order
    audio_spans: tuple[range, ...]  # positions of each audio clip's soft tokens, in prompt order
    text: str  # the rendered template, before expansion

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def special_tokens_from_tokenizer(tokenizer: Tokenizer) -> SpecialTokens:
    """SpecialTokens read from a tokenizer by Gemma 4's token strings (for a directory
    without a manifest, e.g. a checkpoint); a bundle uses its manifest's instead."""
    ids = {role: tokenizer.token_to_id(s) for role, s in TOKEN_STRINGS.items()}
    missing = [TOKEN_STRINGS[r] for r in ("bos_token", "eos_token", "pad_token") if ids[r] is None]
    if missing:
        raise BundleError(f"tokenizer has no {', '.join(missing)}: not a Gemma tokenizer")
    named = {"sot_token": "sot_id", "eot_token": "eot_id", "image_token": "image_token_id",
             "audio_token": "audio_token_id", "video_token": "video_token_id", "boi_token": "boi_id",
             "eoi_token": "eoi_id", "boa_token": "boa_id", "eoa_token": "eoa_id"}
    eos = tuple(i for i in (ids["eos_token"], ids["eot_token"]) if i is not None)
    known = set(named) | {"bos_token", "eos_token", "pad_token"}
    return SpecialTokens(bos_id=ids["bos_token"], eos_ids=eos, pad_id=ids["pad_token"],
                         **{attr: ids[role] for role, attr in named.items()},
                         extra={r: i for r, i in ids.items() if r not in known and i is not None})


def check_special_tokens(tokenizer: Tokenizer, special_tokens: SpecialTokens) -> None:
    """A manifest's ids must be the tokenizer's: a mismatch would put soft tokens on wrong ids."""
    pairs = {"bos_token": special_tokens.bos_id, "pad_token": special_tokens.pad_id,
             "image_token": special_tokens.image_token_id, "audio_token": special_tokens.audio_token_id,
             "video_token": special_tokens.video_token_id, "boi_token": special_tokens.boi_id,
             "eoi_token": special_tokens.eoi_id, "boa_token": special_tokens.boa_id,
             "eoa_token": special_tokens.eoa_id}
    for role, expected in pairs.items():
        actual = tokenizer.token_to_id(TOKEN_STRINGS[role])
        if expected is not None and actual != expected:
            raise BundleError(f"manifest says {TOKEN_STRINGS[role]} is id {expected} but the tokenizer has {actual}")


@dataclass(frozen=True)
class _Media:
    kind: str  # "image" | "audio", for messages
    placeholder: int | None  # <|image|> / <|audio|>: the placeholder, repeated as the soft tokens
    begin: int | None  # <|image> / <|audio>
    end: int | None  # <image|> / <audio|>
    counts: Sequence[int]


def _expand(ids: list[int], media: tuple[_Media, ...]) -> tuple[list[int], list[list[range]]]:
    """One pass: the i-th placeholder of each kind -> begin + placeholder * counts[i] + end.

    Returns the expanded ids and, per kind, the range of each run of soft tokens.
    """
    by_id: dict[int, int] = {}
    for k, m in enumerate(media):
        found = 0 if m.placeholder is None else ids.count(m.placeholder)
        if found != len(m.counts):
            raise InputError(f"the prompt has {found} {m.kind} placeholder(s) but {len(m.counts)} {m.kind} "
                             f"soft-token count(s) were given; pass one per {m.kind}, in prompt order")
        for n in m.counts:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise InputError(f"{m.kind} soft-token counts must be non-negative ints; got {n!r}")
        if found:
            if m.begin is None or m.end is None:
                raise BundleError(f"the bundle's special tokens lack the begin/end-of-{m.kind} ids")
            by_id[m.placeholder] = k
    out: list[int] = []
    spans: list[list[range]] = [[] for _ in media]
    for t in ids:
        k = by_id.get(t)
        if k is None:
            out.append(t)
            continue
        m = media[k]
        n = int(m.counts[len(spans[k])])
        out.append(m.begin)
        spans[k].append(range(len(out), len(out) + n))
        out.extend([t] * n)
        out.append(m.end)
    return out, spans


def build_prompt(messages: Sequence[Message], *, template: ChatTemplate, tokenizer: Tokenizer,
                 special_tokens: SpecialTokens, image_soft_tokens: Sequence[int] = (),
                 audio_soft_tokens: Sequence[int] = (), add_generation_prompt: bool = True,
                 enable_thinking: bool = False) -> Prompt:
    """Render, tokenize and expand. `image_soft_tokens[i]` / `audio_soft_tokens[i]` is the
    soft-token count of the i-th image / audio part in prompt order."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    st = special_tokens
    if st.video_token_id is not None and st.video_token_id in ids:
        raise InputError("video input is not supported by the edgekit runtime; pass sampled frames as images")
    ids, (image_spans, audio_spans) = _expand(ids, (
        _Media("image", st.image_token_id, st.boi_id, st.eoi_id, image_soft_tokens),
        _Media("audio", st.audio_token_id, st.boa_id, st.eoa_id, audio_soft_tokens),
    ))
    input_ids = np.asarray(ids, dtype=np.int64)
    soft = [t for t in (st.image_token_id, st.audio_token_id, st.video_token_id) if t is not None]
    ple_ids = np.where(np.isin(input_ids, soft), np.int64(st.pad_id), input_ids)
    input_ids.setflags(write=False)
    ple_ids.setflags(write=False)
    return Prompt(input_ids=input_ids, ple_ids=ple_ids, image_spans=tuple(image_spans),
                  audio_spans=tuple(audio_spans), text=text)


class PromptBuilder:
    """The template, tokenizer and special tokens of one bundle (or checkpoint) directory."""

    def __init__(self, *, template: ChatTemplate, tokenizer: Tokenizer, special_tokens: SpecialTokens) -> None:
        check_special_tokens(tokenizer, special_tokens)
        self.template, self.tokenizer, self.special_tokens = template, tokenizer, special_tokens

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], *, special_tokens: SpecialTokens | None = None,
                 template_file: str = CHAT_TEMPLATE_FILE) -> PromptBuilder:
        """From tokenizer.json + chat_template.jinja (+ tokenizer_config.json) in `path`;
        `special_tokens` from the manifest, else read from the tokenizer."""
        path = Path(path)
        tokenizer_path = path / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise BundleError(f"{path} has no {TOKENIZER_FILE}")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise BundleError(f"cannot load {tokenizer_path}: {exc}") from None
        return cls(template=ChatTemplate.from_file(path / template_file), tokenizer=tokenizer,
                   special_tokens=special_tokens or special_tokens_from_tokenizer(tokenizer))

    def build(self, messages: Sequence[Message], *, image_soft_tokens: Sequence[int] = (),
              audio_soft_tokens: Sequence[int] = (), add_generation_prompt: bool = True,
              enable_thinking: bool = False) -> Prompt:
        return build_prompt(messages, template=self.template, tokenizer=self.tokenizer,
                            special_tokens=self.special_tokens, image_soft_tokens=image_soft_tokens,
                            audio_soft_tokens=audio_soft_tokens, add_generation_prompt=add_generation_prompt,
                            enable_thinking=enable_thinking)


# --- pieces for apps without a template engine ----------------------------------------------

# Stand-ins for message text while the template is rendered into its pieces: plain words that
# survive `trim` and cannot be in any template.
_SENTINELS = ("EdgekitPieceUserOne", "EdgekitPieceAnswer", "EdgekitPieceUserTwo")


def prompt_pieces(builder: PromptBuilder) -> PromptPieces | None:
    """The manifest's `prompt`: the template rendered around stand-in messages and cut at them,
    the media markers as the tokenizer spells the manifest's ids. None when the template does not
    render as PromptPieces describes (then an app cannot build its prompts without it)."""
    user, answer, again = _SENTINELS
    render, st, tokenizer = builder.template.render, builder.special_tokens, builder.tokenizer
    turn = [{"role": "user", "content": user}]
    answered = [*turn, {"role": "assistant", "content": answer}]
    one = render(turn, add_generation_prompt=False)
    head, _, user_end = one.partition(user)
    generation_prompt = render(turn).removeprefix(one)
    model_start, _, model_end = render(answered, add_generation_prompt=False).removeprefix(one).partition(answer)
    user_start = render([*answered, {"role": "user", "content": again}], add_generation_prompt=False)
    user_start = user_start.removeprefix(one + model_start + answer + model_end).partition(again)[0]
    markers = [None if i is None else tokenizer.id_to_token(i)
               for i in (st.boi_id, st.eoi_id, st.boa_id, st.eoa_id, st.image_token_id, st.audio_token_id)]
    if not user_start or not head.endswith(user_start) or None in markers:
        return None
    pieces = PromptPieces(begin=head.removesuffix(user_start), user_start=user_start, user_end=user_end,
                          model_start=model_start, model_end=model_end, generation_prompt=generation_prompt,
                          image_start=markers[0], image_end=markers[1], audio_start=markers[2],
                          audio_end=markers[3])
    # The pieces must give back what the template renders, media placeholders included.
    media = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": user}]},
             {"role": "assistant", "content": answer}, {"role": "user", "content": again}]
    placeholders = {"image": markers[4], "audio": markers[5]}
    rebuilt = "".join(p if isinstance(p, str) else placeholders[p[0]] for p in prompt_segments(pieces, media))
    rebuilt = rebuilt.replace(markers[0] + markers[4] + markers[1], markers[4])
    rebuilt = rebuilt.replace(markers[2] + markers[5] + markers[3], markers[5])
    return pieces if rebuilt == render(media) else None


Segment = Union[str, tuple[str, Any]]  # text, or ("image" | "audio", the part's media)


def prompt_segments(pieces: PromptPieces, messages: Sequence[Message]) -> list[Segment]:
    """A conversation (user and assistant messages, no system message, thinking off) as the
    stock runner's inputs, in order: text, and each image or clip between its markers. What
    android_demo's Prompt.kt does with the same pieces; adjacent text is joined."""
    out: list[Segment] = [pieces.begin]
    for i, message in enumerate(messages):
        if message["role"] not in ("user", "assistant"):
            raise InputError(f"message {i}: an app's prompt takes user and assistant messages, "
                             f"not {message['role']!r}")
        user = message["role"] == "user"
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        turn: list[Segment] = []
        for part in parts:
            if part["type"] == "text":
                turn.append(turn.pop() + part["text"] if turn and isinstance(turn[-1], str) else part["text"])
            elif part["type"] in ("image", "audio"):
                turn.append((part["type"], part.get(part["type"])))
            else:
                raise InputError(f"message {i}: an app's prompt takes text, image and audio parts, "
                                 f"not {part['type']!r}")
        # The template trims the turn's rendered content, in which media are placeholders.
        if turn and isinstance(turn[0], str):
            turn[0] = turn[0].lstrip()
        if turn and isinstance(turn[-1], str):
            turn[-1] = turn[-1].rstrip()
        out.append(pieces.user_start if user else pieces.model_start)
        for segment in turn:
            if isinstance(segment, str):
                out.append(segment)
            else:
                start, end = ((pieces.image_start, pieces.image_end) if segment[0] == "image"
                              else (pieces.audio_start, pieces.audio_end))
                out += [start, segment, end]
        out.append(pieces.user_end if user else pieces.model_end)
    out.append(pieces.generation_prompt)
    joined: list[Segment] = []
    for segment in out:
        if isinstance(segment, str) and joined and isinstance(joined[-1], str):
            joined[-1] += segment
        elif segment != "":
            joined.append(segment)
    return joined


__all__ = ["ChatTemplate", "Message", "Prompt", "PromptBuilder", "Segment", "build_prompt", "check_special_tokens",
           "prompt_pieces", "prompt_segments", "special_tokens_from_tokenizer", "special_tokens_map"]
