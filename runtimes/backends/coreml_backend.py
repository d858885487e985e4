"""Core ML backend: the text decoder's KV caches are Core ML states (one MLState per conversation).

On macOS 15 / iOS 18 the programs run with coremltools' MLModel.predict (Core ML itself).
Off Apple hardware nothing can run them; `edgekit verify` evaluates the saved programs op
by op in numpy instead (edgekit.export.coreml.program_check passes its own `programs`).

Per call the host does what an app does (docs/apple.md): looks the token and per-layer rows
up in the bundle's row files (edgekit.runtimes.embedding_tables), puts soft tokens at
image / audio positions (their per-layer rows are the pad id's), and calls `prefill` with a
chunk padded to its fixed size, or `decode` with one token.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edgekit.bundle import Bundle
from edgekit.errors import BundleError, InputError, NotAvailableError, require
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER
from edgekit.models.family import PER_LAYER_EMBEDDING
from edgekit.runtimes.embedding_tables import EmbeddingTable, TableLayout

PREFILL, DECODE = "prefill", "decode"  # the decoder's functions (export/coreml/decoder.py)
DECODER_INPUTS = ("inputs_embeds", "per_layer_inputs", "cache_position", "last_index")
APPLE_ONLY = ("running a Core ML bundle needs Apple's Core ML (macOS 15 / iOS 18 or later); on this machine "
              "`edgekit verify BUNDLE --reference CHECKPOINT` checks its programs")


class Programs(Protocol):
    """One .mlpackage: its functions run with inputs by name; a state holds the KV caches."""

    def run(self, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]: ...

    def new_state(self, function: str) -> Any: ...


class CoreMLPrograms:
    """An .mlpackage on Core ML (macOS): one MLModel per function, states made by Core ML."""

    def __init__(self, path: Path, functions: tuple[str, ...]) -> None:
        ct = require("coremltools", extra="coreml")
        try:
            self._models = {f: ct.models.MLModel(str(path), function_name=f if f != "main" else None,
                                                 compute_units=ct.ComputeUnit.ALL) for f in functions}
        except Exception as exc:  # Core ML says why in its own words
            raise BundleError(f"Core ML cannot load {path.name}: {str(exc).splitlines()[0] if str(exc) else exc}") \
                from None

    def run(self, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        model = self._models[function]
        out = model.predict(inputs, state=state) if state is not None else model.predict(inputs)
        return {name: np.asarray(value) for name, value in out.items()}

    def new_state(self, function: str) -> Any:
        return self._models[function].make_state()


ProgramLoader = Callable[[Path, tuple[str, ...]], Programs]


class CoreMLBackend:
    def __init__(self, bundle: Bundle, *, providers: tuple[str, ...] | None = None, threads: int | None = None,
                 programs: ProgramLoader | None = None) -> None:
        # `providers` and `threads` are ONNX Runtime's; Core ML picks its compute units itself.
        if programs is None:
            if sys.platform != "darwin":
                raise NotAvailableError(APPLE_ONLY)
            programs = CoreMLPrograms
        self.bundle = bundle
        self.manifest = manifest = bundle.manifest
        self._load = programs
        decoder = manifest.method(METHOD_TEXT_DECODER)
        self._functions = {str(k): int(v) for k, v in decoder.extra.get("functions", {DECODE: 1}).items()}
        self._decoder = programs(bundle.file(decoder.file), tuple(self._functions))
        self.max_prefill_tokens = max(self._functions.values())
        tables = manifest.extra.get("embedding_tables") or {}
        try:
            self._tokens = EmbeddingTable(bundle.file(tables[METHOD_TOKEN_EMBEDDING]["file"]),
                                          TableLayout.from_dict(tables[METHOD_TOKEN_EMBEDDING]))
            ple = tables.get(PER_LAYER_EMBEDDING)
            self._per_layer = (EmbeddingTable(bundle.file(ple["file"]), TableLayout.from_dict(ple)) if ple else None)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{bundle.path.name}'s manifest does not describe its embedding tables ({exc})") from None
        self._ple_width = int(decoder.inputs[1].shape[-1])
        self._encoders: dict[str, Programs] = {}
        tokens = manifest.special_tokens
        self._soft_ids = tuple(t for t in (tokens.image_token_id, tokens.audio_token_id) if t is not None)
        self.reset()

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._state = self._decoder.new_state(DECODE)
        self._position = 0

    def truncate(self, length: int) -> bool:
        return length >= self._position  # the sliding layers' ring cannot give back overwritten rows

    def mark_turn_start(self, position: int | None) -> None:
        pass  # as truncate: a turn that goes back is fed again

    # --- text ------------------------------------------------------------------------------
    def _rows(self, ids: np.ndarray, image_features, audio_features) -> tuple[np.ndarray, np.ndarray]:
        """inputs_embeds [S,H] and per_layer_inputs [S,L*P] for `ids`, soft tokens in place."""
        tokens = self.manifest.special_tokens
        soft = np.isin(ids, self._soft_ids)
        text_ids = np.where(soft, tokens.pad_id, ids)
        embeds = self._tokens.lookup(text_ids)
        for token_id, features in ((tokens.image_token_id, image_features), (tokens.audio_token_id, audio_features)):
            if features is not None and token_id is not None:
                slots = ids == token_id
                if int(slots.sum()) != len(features):
                    raise InputError(f"{int(slots.sum())} soft-token positions for {len(features)} feature rows")
                embeds[slots] = np.asarray(features, np.float32)[:, : embeds.shape[1]]
        per_layer = (self._per_layer.lookup(text_ids) if self._per_layer is not None
                     else np.zeros((len(ids), self._ple_width), np.float32))
        return embeds, per_layer

    def forward(self, input_ids: np.ndarray, *, image_features: np.ndarray | None = None,
                audio_features: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if not 1 <= len(ids) <= self.max_prefill_tokens:
            raise InputError(f"{len(ids)} tokens in one call; this program takes 1 to {self.max_prefill_tokens} "
                             "(feed longer prompts in chunks)")
        context = self.manifest.max_context
        if self._position + len(ids) > context:
            raise InputError(f"{self._position} cached + {len(ids)} new tokens pass this bundle's context of "
                             f"{context} tokens")
        embeds, per_layer = self._rows(ids, image_features, audio_features)
        chunk = self._functions.get(PREFILL, 1)
        if len(ids) > 1 and self._position + chunk <= context:
            logits = self._call(PREFILL, embeds, per_layer, chunk)
        else:  # one token, or a padded chunk would pass the context: token by token
            for i in range(len(ids)):
                logits = self._call(DECODE, embeds[i:i + 1], per_layer[i:i + 1], 1)
        return logits

    def _call(self, function: str, embeds: np.ndarray, per_layer: np.ndarray, size: int) -> np.ndarray:
        n = len(embeds)
        padded_embeds = np.zeros((1, size, embeds.shape[1]), np.float32)
        padded_ple = np.zeros((1, size, per_layer.shape[1]), np.float32)
        padded_embeds[0, :n], padded_ple[0, :n] = embeds, per_layer
        inputs = dict(zip(DECODER_INPUTS, (padded_embeds, padded_ple,
                                           np.arange(self._position, self._position + size, dtype=np.int32),
                                           np.asarray([n - 1], np.int32))))
        logits = self._decoder.run(function, inputs, self._state)["logits"]
        self._position += n
        return np.asarray(logits, np.float32).reshape(1, -1)

    # --- encoders ----------------------------------------------------------------------------
    def _encoder(self, name: str) -> tuple[Programs, Any]:
        if not self.manifest.has_method(name):
            raise BundleError(f"bundle {self.bundle.path} has no {name} method")
        spec = self.manifest.method(name)
        if name not in self._encoders:
            functions = tuple(spec.extra.get("functions", {"main": None}))
            self._encoders[name] = self._load(self.bundle.file(spec.file), functions)
        return self._encoders[name], spec

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        program, spec = self._encoder(METHOD_VISION_ENCODER)
        patches = int(spec.inputs[0].shape[1])
        pixels = np.zeros((1, patches, pixel_values.shape[-1]), np.float32)
        positions = np.full((1, patches, 2), -1, np.int32)
        n = min(pixel_values.shape[1], patches)
        pixels[:, :n], positions[:, :n] = pixel_values[:, :n], position_ids[:, :n]
        out = program.run("main", {spec.inputs[0].name: pixels, spec.inputs[1].name: positions})
        tokens, valid = out[spec.outputs[0].name], out[spec.outputs[1].name]
        return np.asarray(tokens[0][np.asarray(valid[0]).astype(bool)], np.float32)

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        program, spec = self._encoder(METHOD_AUDIO_ENCODER)
        buckets = sorted((int(frames), str(name)) for name, frames in spec.extra["functions"].items())
        fitting = [(frames, name) for frames, name in buckets if frames >= len(features)]
        if not fitting:
            raise InputError(f"{len(features)} audio frames pass the longest audio this bundle takes "
                             f"({buckets[-1][0]} frames)")
        frames, function = fitting[0]
        padded = np.zeros((1, frames, features.shape[-1]), np.float32)
        padded_mask = np.zeros((1, frames), np.int32)
        padded[0, : len(features)], padded_mask[0, : len(mask)] = features, mask
        out = program.run(function, {spec.inputs[0].name: padded, spec.inputs[1].name: padded_mask})
        tokens, valid = out[spec.outputs[0].name], out[spec.outputs[1].name]
        return np.asarray(tokens[0][np.asarray(valid[0]).astype(bool)], np.float32)
