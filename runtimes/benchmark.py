"""`edgekit bench`: load time, prefill and decode speed, peak memory of one bundle.

Measured through the backend's forward (the runner's own decode step) on synthetic
token ids, the prompt fed in the engine's chunks, so any bundle can be measured without a
prompt; peak RSS is this process's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import InputError
from edgekit.runtimes.engine import Engine, feed_prompt, peak_rss_mb
from edgekit.runtimes.prompt import Prompt


@dataclass(frozen=True)
class BenchResult:
    bundle: str
    format: str
    recipe: str
    bundle_mb: float
    load_s: float
    prompt_tokens: int
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def bench_bundle(path: Path | str, *, prompt_tokens: int = 128, decode_tokens: int = 64,
                 threads: int | None = None, seed: int = 0) -> BenchResult:
    started = time.perf_counter()
    engine = Engine.open(path, threads=threads)
    manifest = engine.bundle.manifest
    if prompt_tokens + decode_tokens >= engine.max_context:
        raise InputError(f"--prompt-tokens {prompt_tokens} + --decode-tokens {decode_tokens} do not fit this "
                         f"bundle's context of {engine.max_context} tokens")
    # Touch every session once so load time includes graph initialisation.
    engine.backend.forward(np.asarray([manifest.special_tokens.bos_id], np.int64))
    load_s = time.perf_counter() - started
    engine.backend.reset()
    rng = np.random.default_rng(seed)
    # Ordinary vocabulary ids (special tokens sit at the two ends of Gemma's vocabulary).
    ids = rng.integers(300, min(manifest.model.vocab_size, 250_000), size=prompt_tokens).astype(np.int64)
    ids[0] = manifest.special_tokens.bos_id
    prompt = Prompt(input_ids=ids, ple_ids=ids, image_spans=(), audio_spans=(), text="")
    t = time.perf_counter()
    # in the chunks the engine feeds (an ExecuTorch decoder takes at most max_prefill_tokens)
    logits = feed_prompt(engine.backend, prompt, images=[], audios=[], chunk=engine.prefill_chunk)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(decode_tokens):
        logits = engine.backend.forward(np.asarray([int(logits.argmax())], np.int64))[-1]
    decode_s = time.perf_counter() - t
    size = sum(f.size for f in manifest.files)
    return BenchResult(bundle=str(engine.bundle.path), format=manifest.format,
                       recipe=manifest.recipe, bundle_mb=round(size / 1e6, 1),
                       load_s=round(load_s, 3), prompt_tokens=prompt_tokens,
                       prefill_tok_s=round(prompt_tokens / prefill_s, 2), decode_tokens=decode_tokens,
                       decode_tok_s=round(decode_tokens / decode_s, 2), peak_rss_mb=round(peak_rss_mb(), 1))
