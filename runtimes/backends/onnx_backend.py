"""ONNX Runtime backend: the explicit KV cache lives on the host as numpy arrays.

No torch, no transformers: a Raspberry Pi runs this with onnxruntime and numpy only.
Graph and tensor names come from edgekit.onnx_layout, the module the exporter used.
"""

from __future__ import annotations

import re
import sys
from functools import cached_property

import numpy as np

from edgekit import onnx_layout as L
from edgekit.bundle import Bundle
from edgekit.errors import BundleError, MissingDependencyError
from edgekit.runtimes.backends.base import pad_audio_frames
from edgekit.runtimes.free_heap import release_free_heap
from edgekit.runtimes.mapped_pages import advise_random_access, release_file_pages
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER

_PAST = re.compile(r"past_key_values\.(\d+)\.key")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    return onnxruntime


def usable_providers(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The wanted providers this onnxruntime build has, CPU last; says so when one is missing."""
    available = set(_ort().get_available_providers())
    chosen = tuple(p for p in wanted if p in available)
    missing = [p for p in wanted if p not in available]
    if missing:
        print(f"edgekit: warning: {', '.join(missing)} not available in this onnxruntime; "
              f"running on {', '.join(chosen) or 'CPUExecutionProvider'}", file=sys.stderr)
    if "CPUExecutionProvider" not in chosen:
        chosen = (*chosen, "CPUExecutionProvider")
    return chosen


class OnnxBackend:
    # onnxruntime's CPU arena keeps the largest buffers a call ever asked for: after one
    # 128-token prefill, ~290 MiB of logits and activations stayed for the whole session at
    # full E2B depth (bench/RESULTS.md section 9). Without it, decode allocations are small
    # and go back to the heap; decode speed was the same within noise.
    memory_arena: bool = False
    # Sliding layers keep this many rows beyond their window - 1, counted back from the open
    # turn's start (mark_turn_start; the template re-renders the whole answer, without the
    # thought channel, so the next turn goes back a few tokens before it), and the rows are cut
    # once per this many positions. 128 rows of E2B's 12 sliding layers: 3 MiB; an answer adds
    # its own rows until the next turn.
    sliding_slack: int  # the manifest's prefill_chunk, set in __init__

    def __init__(self, bundle: Bundle, *, providers: tuple[str, ...] | None = None,
                 threads: int | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.sliding_slack = self.manifest.prefill_chunk
        self._providers = usable_providers(tuple(providers or self.manifest.execution_providers
                                                 or ("CPUExecutionProvider",)))
        self._threads = threads
        self.max_prefill_tokens = None  # the graphs take any sequence length
        self._sessions: dict = {}
        self.reset()

    # --- sessions, created on first use --------------------------------------------------
    def _session(self, method: str):
        if method not in self._sessions:
            if not self.manifest.has_method(method):
                raise BundleError(f"bundle {self.bundle.path} has no {method} graph")
            ort = _ort()
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.enable_cpu_mem_arena = self.memory_arena
            if self._threads:
                options.intra_op_num_threads = self._threads
            path = self.bundle.file(self.manifest.method(method).file)
            try:
                self._sessions[method] = ort.InferenceSession(str(path), options, providers=list(self._providers))
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise BundleError(f"cannot load {path.name}: {str(exc).splitlines()[0]}") from None
            # Prepacking copied what it read of the weights; almost none of those mapped pages
            # is read again (one that is comes back from the file). What is read later is
            # table rows, by token id.
            data = path.with_name(path.name + ".data")
            release_file_pages(data)
            advise_random_access(data)
        return self._sessions[method]

    @cached_property
    def _shrink_after(self):
        """Run options for a prefill when the arena is on: hand its prefill-sized buffers back
        once the call returns (those still held by the outputs stay)."""
        if not self.memory_arena:
            return None
        options = _ort().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options

    @cached_property
    def _cache_shapes(self) -> dict[int, tuple[int, int]]:
        """Cache-owning layer -> (kv_heads, head_dim), read from the decoder graph's inputs."""
        shapes = {}
        for value in self._session(METHOD_TEXT_DECODER).get_inputs():
            match = _PAST.fullmatch(value.name)
            if match:
                shapes[int(match.group(1))] = (int(value.shape[1]), int(value.shape[3]))
        return shapes

    @cached_property
    def _keeps_last_logits(self) -> bool:
        """Whether the decoder takes logits_to_keep (bundles exported before it do not)."""
        decoder = self._session(METHOD_TEXT_DECODER)
        return any(i.name == L.LOGITS_TO_KEEP for i in decoder.get_overridable_initializers())

    @cached_property
    def hidden_size(self) -> int:
        return int(self.manifest.model.hidden_size)

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position = 0
        self._past: dict[str, np.ndarray] = {}
        self._turn_start: int | None = None

    @cached_property
    def _sliding_past(self) -> tuple[frozenset[str], int] | None:
        """(past inputs of the sliding layers, their window): the decoder masks by each kind's
        own past length, so those layers need only the last window - 1 positions. None for
        bundles whose manifest does not say so (exported before: every past whole)."""
        extra = self.manifest.method(METHOD_TEXT_DECODER).extra
        layers, window = extra.get("sliding_cache_layers"), extra.get("sliding_window")
        if not layers or not window:
            return None
        return frozenset(name % layer for layer in layers for name in (L.PAST_KEY, L.PAST_VALUE)), int(window)

    def _trim_sliding(self, name: str, value: np.ndarray, position: int) -> np.ndarray:
        """A sliding layer's past, ending at `position`, less the rows no truncate will need. A
        truncate may go back sliding_slack positions before the open turn's start (when the
        engine marked one: the next turn re-renders its answer), else before `position`; the
        window - 1 rows before that point stay. Cut once sliding_slack more rows are held (one
        copy every sliding_slack positions, not every call)."""
        sliding, window = self._sliding_past or (frozenset(), 0)
        if name not in sliding:
            return value
        back_to = position if self._turn_start is None else min(position, self._turn_start)
        first_needed = max(0, back_to - self.sliding_slack - (window - 1))
        first_held = position - value.shape[2]
        if first_needed - first_held <= self.sliding_slack:
            return value
        return np.ascontiguousarray(value[:, :, first_needed - first_held:])

    def truncate(self, length: int) -> bool:
        if length >= self._position:
            return True
        sliding, window = self._sliding_past or (frozenset(), 1)
        past = {}
        for name, value in self._past.items():
            first = self._position - value.shape[2]  # the position of the first row held
            start = max(0, length - (window - 1)) if name in sliding else 0
            if start < first:
                return False  # rows the sliding window already dropped
            past[name] = value[:, :, start - first:length - first]
        self._past = past
        self._position = length
        self._turn_start = None
        return True

    def mark_turn_start(self, position: int | None) -> None:
        self._turn_start = position

    # --- text ------------------------------------------------------------------------------
    def forward(self, input_ids: np.ndarray, *, image_features: np.ndarray | None = None,
                audio_features: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        empty = np.zeros((0, self.hidden_size), np.float32)
        embeds, per_layer = self._session(METHOD_TOKEN_EMBEDDING).run(None, {
            L.INPUT_IDS: ids,
            L.IMAGE_FEATURES: empty if image_features is None else image_features.astype(np.float32),
            L.AUDIO_FEATURES: empty if audio_features is None else audio_features.astype(np.float32),
        })
        seq = ids.shape[1]
        total = self._position + seq
        feed = {L.INPUTS_EMBEDS: embeds, L.PER_LAYER_INPUTS: per_layer,
                L.ATTENTION_MASK: np.ones((1, total), np.int64),
                L.POSITION_IDS: np.arange(self._position, total, dtype=np.int64)[None]}
        for layer, (heads, dim) in self._cache_shapes.items():
            for name in (L.PAST_KEY % layer, L.PAST_VALUE % layer):
                feed[name] = self._past.get(name, np.zeros((1, heads, 0, dim), np.float32))
        decoder = self._session(METHOD_TEXT_DECODER)
        if self._keeps_last_logits:
            feed[L.LOGITS_TO_KEEP] = np.array(1, np.int64)  # only the last position's are read
        outputs = decoder.run(None, feed, self._shrink_after if seq > 1 else None)
        names = [o.name for o in decoder.get_outputs()]
        for name, value in zip(names[1:], outputs[1:]):
            name = name.replace("present.", "past_key_values.")
            self._past[name] = self._trim_sliding(name, value, total)  # rows past the window are masked
        self._position = total
        if seq > 1:
            release_free_heap()  # the prefill's freed activations (runtimes/free_heap.py)
        return outputs[0][0]

    # --- encoders ----------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        features, valid = self._session(METHOD_VISION_ENCODER).run(None, {
            L.PIXEL_VALUES: pixel_values.astype(np.float32), L.PIXEL_POSITION_IDS: position_ids.astype(np.int64)})
        release_free_heap()  # the encoder's freed activations
        # [tokens, hidden] (onnxruntime-genai's layout) or [1, tokens, hidden]
        return features.reshape(-1, features.shape[-1])[valid.reshape(-1).astype(bool)]

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        padded, padded_mask = pad_audio_frames(features, mask,
                                               extra=self.manifest.method(METHOD_AUDIO_ENCODER).extra)
        tokens, valid = self._session(METHOD_AUDIO_ENCODER).run(None, {
            L.INPUT_FEATURES: padded, L.INPUT_FEATURES_MASK: padded_mask})
        release_free_heap()
        return tokens[0][valid[0].astype(bool)]
