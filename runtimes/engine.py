"""Generation on a bundle: prompt -> media encoders -> chunked prefill -> decode loop.

    messages ─► chat template + soft-token expansion (prompt.py)
    images / audio ─► numpy preprocessing ─► backend encoders ─► soft tokens
    ─► prefill in chunks (the cached prefix of an earlier turn is reused) ─► sample ─► stream text

The KV cache stays in the backend between calls: a chat turn whose prompt starts with
what the cache already holds only feeds the new tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgekit.bundle import Bundle, load_bundle
from edgekit.errors import InputError
from edgekit.machine import check_threads
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_VISION_ENCODER
from edgekit.runtimes.backends import Backend, open_backend
from edgekit.runtimes.image_preprocess import ImageParams, preprocess_image
from edgekit.runtimes.mel_features import MelParams, log_mel_features
from edgekit.runtimes.prompt import Prompt, PromptBuilder
from edgekit.runtimes.sampling import Sampler, SamplingParams
from edgekit.runtimes.text_stream import ChannelStreamer
from edgekit.runtimes.wav_io import load_audio


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually fed (the rest came from the cache)
    new_tokens: int = 0
    image_encode_s: float = 0.0
    audio_encode_s: float = 0.0
    audio_seconds: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    peak_rss_mb: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes from the prefill's logits; decode steps make the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prefill_tok_s": round(self.prefill_tok_s, 2),
                "decode_tok_s": round(self.decode_tok_s, 2)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@dataclass
class _Media:
    kind: str  # "image" | "audio"
    source: Any
    features: np.ndarray | None = None


@dataclass
class Engine:
    bundle: Bundle
    backend: Backend
    prompts: PromptBuilder
    prefill_chunk: int  # the manifest's; also bounds an ONNX prefill's [chunk, vocab] logits
    last_stats: GenerationStats = field(default_factory=GenerationStats)
    last_token_ids: list[int] = field(default_factory=list)  # the last answer's tokens, stop token included
    last_thought: str = ""  # what the model thought before its last answer (enable_thinking)
    _cached_ids: list = field(default_factory=list)  # what the backend's cache holds, per position
    # Encoder outputs of the conversation's media, by what the encoder was given: a chat
    # re-sends every earlier image and clip each turn, and encoding is the slow part.
    _encoded: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | str, *, providers: tuple[str, ...] | None = None, threads: int | None = None,
             verify: str = "cached") -> Engine:
        check_threads(threads)  # before the first open of a bundle hashes it
        bundle = load_bundle(path, verify=verify)
        backend = open_backend(bundle, providers=providers, threads=threads)
        prompts = PromptBuilder.from_dir(bundle.path, special_tokens=bundle.manifest.special_tokens)
        return cls(bundle=bundle, backend=backend, prompts=prompts, prefill_chunk=bundle.manifest.prefill_chunk)

    @property
    def max_context(self) -> int:
        return int(self.bundle.manifest.max_context)

    # --- media -------------------------------------------------------------------------------
    def _collect_media(self, messages: Sequence[dict]) -> list[_Media]:
        media = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) or content is None:
                continue
            for part in content:
                if part.get("type") in ("image", "audio"):
                    source = next((part[k] for k in (part["type"], "path", "url") if part.get(k) is not None), None)
                    if source is None:
                        raise InputError(f"a {part['type']} part needs a file path or object under {part['type']!r}")
                    media.append(_Media(part["type"], source))
        return media

    def _encode(self, media: list[_Media], stats: GenerationStats) -> None:
        manifest = self.bundle.manifest
        used = {}
        for item in media:
            start = time.perf_counter()
            if item.kind == "image":
                if not manifest.has_method(METHOD_VISION_ENCODER):
                    raise InputError("this bundle has no vision encoder; export it with --modalities including vision")
                params = ImageParams.from_dict(manifest.image_preprocessing.model_dump())
                pixels, positions, tokens = preprocess_image(item.source, params=params)
                # Only the image's own patches: padding would cost encoder time for nothing.
                patches = tokens * params.pooling_kernel_size**2
                inputs = (pixels[:, :patches], positions[:, :patches])
                item.features = self._encoded_once(used, "image", inputs, self.backend.encode_image)
                stats.image_encode_s += time.perf_counter() - start
            else:
                if not manifest.has_method(METHOD_AUDIO_ENCODER):
                    raise InputError("this bundle has no audio encoder; export it with --modalities including audio")
                audio = manifest.audio_preprocessing
                waveform = (np.asarray(item.source, np.float32) if isinstance(item.source, np.ndarray)
                            else load_audio(item.source, target_rate=audio.sampling_rate))
                params = MelParams.from_dict({**audio.model_dump(), **audio.extra})
                inputs = log_mel_features(waveform, params=params)
                item.features = self._encoded_once(used, "audio", inputs, self.backend.encode_audio)
                stats.audio_seconds += len(waveform) / audio.sampling_rate
                stats.audio_encode_s += time.perf_counter() - start
        self._encoded = used  # the media of this conversation only

    def _encoded_once(self, used: dict, kind: str, inputs: tuple[np.ndarray, ...], encode) -> np.ndarray:
        """The encoder's output for these inputs: from an earlier turn when it saw the same."""
        digest = hashlib.sha1()
        for array in inputs:
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        key = (kind, digest.hexdigest())
        features = self._encoded.get(key)
        used[key] = features if features is not None else encode(*inputs)
        return used[key]

    # --- prefill -----------------------------------------------------------------------------
    @staticmethod
    def _cache_keys(prompt: Prompt, media: list[_Media]) -> list:
        """What each prompt position holds: its token id, or for a soft token the media it
        came from (every soft token of a kind shares one placeholder id, so two different
        clips of the same length would otherwise look identical to the cache)."""
        keys: list = prompt.input_ids.tolist()
        spans = [*zip(prompt.image_spans, [m for m in media if m.kind == "image"]),
                 *zip(prompt.audio_spans, [m for m in media if m.kind == "audio"])]
        for span, item in spans:
            digest = hashlib.sha1(np.ascontiguousarray(item.features).tobytes()).hexdigest()
            for offset, pos in enumerate(span):
                keys[pos] = (digest, offset)
        return keys

    def _prefill(self, prompt: Prompt, media: list[_Media], stats: GenerationStats) -> np.ndarray:
        ids = prompt.input_ids.tolist()
        keys = self._cache_keys(prompt, media)
        reuse = self._reusable_prefix(keys)
        if reuse == 0:
            self.backend.reset()
        # Until the whole prompt is in, the cache holds only the reused prefix for sure (an
        # interrupted feed must not leave keys for positions it never wrote).
        self._cached_ids = keys[:reuse]
        start = time.perf_counter()
        self.backend.mark_turn_start(None)  # the prompt's own rows may be cut as it is fed
        logits = feed_prompt(self.backend, prompt, images=[m.features for m in media if m.kind == "image"],
                             audios=[m.features for m in media if m.kind == "audio"], begin=reuse,
                             chunk=self.prefill_chunk)
        # The next turn re-renders this answer: it goes back to about here.
        self.backend.mark_turn_start(self.backend.position)
        stats.prefill_s = time.perf_counter() - start
        stats.prefilled_tokens = len(ids) - reuse
        self._cached_ids = keys
        return logits

    def _reusable_prefix(self, ids: list) -> int:
        """How many leading prompt tokens the cache can keep: the common prefix with what it
        holds (the rest is dropped), less one, since the last position's logits are needed."""
        cached = self._cached_ids
        if self.backend.position != len(cached):
            return 0
        n = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        if n < len(cached) and not self.backend.truncate(n):
            # The template re-renders earlier answers (without the thought channel the
            # generation prompt opened), so the tail of the cache is usually stale.
            return 0
        return n

    # --- generate ----------------------------------------------------------------------------
    def generate(self, messages: Sequence[dict], *, sampling: SamplingParams | None = None,
                 enable_thinking: bool = False, on_thought: Callable[[str], None] | None = None) -> Iterator[str]:
        """Yield text pieces of the model's answer as they are produced; stats in `last_stats`.
        What it thinks first (its thought channel) goes to `on_thought` piece by piece and
        to `last_thought`, never into the answer."""
        sampling = sampling or SamplingParams()
        stats = GenerationStats()
        self.last_stats = stats
        started = time.perf_counter()
        media = self._collect_media(messages)
        self._encode(media, stats)
        prompt = self.prompts.build(messages, image_soft_tokens=[len(m.features) for m in media if m.kind == "image"],
                                    audio_soft_tokens=[len(m.features) for m in media if m.kind == "audio"],
                                    enable_thinking=enable_thinking)
        stats.prompt_tokens = len(prompt)
        if len(prompt) >= self.max_context:
            raise InputError(f"the prompt is {len(prompt)} tokens but this bundle's context is {self.max_context} "
                             "tokens; shorten it or export with a longer --context")
        logits = self._prefill(prompt, media, stats)
        yield from self._decode(logits, prompt, sampling, stats, started, on_thought)

    def _decode(self, logits: np.ndarray, prompt: Prompt, sampling: SamplingParams, stats: GenerationStats,
                started: float, on_thought: Callable[[str], None] | None) -> Iterator[str]:
        sampler = Sampler(sampling)
        self.last_token_ids = []
        self.last_thought = ""
        special = self.bundle.manifest.special_tokens
        stop_ids = set(special.eos_ids)
        streamer = ChannelStreamer(self.prompts.tokenizer, open_id=special.extra.get("soc_token"),
                                   close_id=special.extra.get("eoc_token"))

        def thought(piece: str) -> None:
            if piece:
                self.last_thought += piece
                if on_thought is not None:
                    on_thought(piece)

        seen = list(prompt.input_ids.tolist())
        cache_keys = list(self._cached_ids)  # the prompt's keys (media-aware)
        decode_start = time.perf_counter()
        stats.stop_reason = "max_new_tokens"
        while stats.new_tokens < sampling.max_new_tokens:
            token = sampler.next_token(logits, seen_ids=seen)
            stats.new_tokens += 1
            if stats.new_tokens == 1:
                stats.time_to_first_token_s = time.perf_counter() - started
                decode_start = time.perf_counter()
            seen.append(token)
            self.last_token_ids.append(token)
            if token in stop_ids:
                stats.stop_reason = "stop_token"
                self._cached_ids = cache_keys  # the stop token was never fed
                break
            thinking, piece = streamer.push(token)
            thought(thinking)
            if piece:
                yield piece
            if stats.new_tokens == sampling.max_new_tokens:
                self._cached_ids = cache_keys  # the last token is not fed: nothing reads its logits
                break
            if self.backend.position + 1 >= self.max_context:
                stats.stop_reason = "context_full"
                self._cached_ids = cache_keys
                break
            logits = self.backend.forward(np.asarray([token], np.int64))[-1]
            cache_keys.append(token)
            self._cached_ids = cache_keys
        thinking, tail = streamer.flush()
        thought(thinking)
        if tail:
            yield tail
        stats.decode_s = time.perf_counter() - decode_start
        stats.peak_rss_mb = peak_rss_mb()

    def reset(self) -> None:
        self.backend.reset()
        self._cached_ids = []
        self._encoded = {}


def feed_prompt(backend, prompt: Prompt, *, images: list[np.ndarray], audios: list[np.ndarray], begin: int = 0,
                chunk: int | None = None) -> np.ndarray:
    """Feed `prompt` from position `begin` in chunks the backend takes (an ExecuTorch decoder
    takes at most max_prefill_tokens per call); each chunk's soft-token positions get their
    rows of the encoders' features. Returns the last position's logits."""
    ids = prompt.input_ids.tolist()
    image_rows = _rows_by_position(prompt.image_spans, images, "image")
    audio_rows = _rows_by_position(prompt.audio_spans, audios, "audio")
    limit = backend.max_prefill_tokens
    chunk = min(chunk or limit or len(ids), limit or len(ids))
    logits = None
    for start in range(begin, len(ids), chunk):
        end = min(start + chunk, len(ids))
        logits = backend.forward(np.asarray(ids[start:end], np.int64),
                                 image_features=_take(image_rows, start, end),
                                 audio_features=_take(audio_rows, start, end))
    return logits[-1].copy()  # a view would keep the chunk's whole [chunk, vocab] block alive while decoding


def _rows_by_position(spans: Sequence[range], features: list[np.ndarray], kind: str) -> dict[int, np.ndarray]:
    """Prompt position -> the feature row the soft token at that position takes."""
    rows: dict[int, np.ndarray] = {}
    for span, feats in zip(spans, features):
        if len(span) != len(feats):
            raise InputError(f"the {kind} encoder gave {len(feats)} soft tokens where the prompt has {len(span)}")
        rows.update({pos: feats[i] for i, pos in enumerate(span)})
    return rows


def _take(rows: dict[int, np.ndarray], begin: int, end: int) -> np.ndarray | None:
    picked = [rows[p] for p in range(begin, end) if p in rows]
    return np.stack(picked) if picked else None


def load(path: Path | str, **options: Any) -> Engine:
    """Open a bundle for generation: `edgekit.runtimes.load("model.edgekit").generate(...)`."""
    return Engine.open(path, **options)
