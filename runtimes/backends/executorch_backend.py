"""ExecuTorch backend: the .pte's KV cache lives in text_decoder's mutable buffers.

ExecuTorch's Python bindings link libtorch, so this module (and only this one) imports
torch, on first use; `pip install 'edgekit[executorch]'` brings both. Method names and
the packed embedding layout (input embedding + per-layer-embedding rows side by side)
are those of export/executorch/methods.py, read back from the manifest.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from edgekit.bundle import Bundle
from edgekit.errors import BundleError, NotAvailableError, require
from edgekit.runtimes.backends.base import pad_audio_frames
from edgekit.runtimes.free_heap import release_free_heap
from edgekit.runtimes.no_mlock import mlock_disabled
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER


class ExecutorchBackend:
    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        if self.manifest.backend == "coreml" and sys.platform != "darwin":
            raise NotAvailableError(f"{bundle.path.name} runs its text methods on ExecuTorch's Core ML delegate, "
                                    "which only Apple devices have (iOS 18 / macOS 15 or later)")
        self._torch = require("torch", extra="executorch")
        runtime = _runtime_without_compiler()
        try:  # quantized embedding kernels register themselves on import (shared/EXPORT-NOTES.md)
            import executorch.kernels.quantized  # noqa: F401
        except ImportError:
            pass
        pte = bundle.file(self.manifest.method(METHOD_TEXT_DECODER).file)
        data = self.manifest.extra.get("program_data")  # the weights, when exported with --external-weights
        try:
            with mlock_disabled():  # as root, the bindings would lock every segment they load
                self._program = runtime.Runtime.get().load_program(
                    str(pte), data_path=str(bundle.file(data)) if data else None)
        except Exception as exc:
            raise BundleError(f"cannot load {pte.name}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        self._methods: dict = {}
        decoder = self.manifest.method(METHOD_TEXT_DECODER)
        self.max_prefill_tokens = int(decoder.extra.get("max_seq_len", 1))
        self.image_token_id = self.manifest.special_tokens.image_token_id
        self.audio_token_id = self.manifest.special_tokens.audio_token_id
        self.reset()

    def _method(self, name: str):
        if name not in self._methods:
            if not self.manifest.has_method(name):
                raise BundleError(f"bundle {self.bundle.path} has no {name} method")
            try:
                with _native_logs_hidden(), mlock_disabled():
                    self._methods[name] = self._program.load_method(name)
            except RuntimeError as exc:  # e.g. an operator this runtime build lacks
                raise BundleError(f"cannot load method {name} of {self.bundle.path.name}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
        return self._methods[name]

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        # Positions past the current one are masked as future, so no buffer needs clearing.
        self._position = 0

    def truncate(self, length: int) -> bool:
        # Sliding layers keep a ring buffer: going back may need rows already overwritten.
        if length >= self._position:
            return True
        return False

    def forward(self, input_ids: np.ndarray, *, image_features: np.ndarray | None = None,
                audio_features: np.ndarray | None = None) -> np.ndarray:
        torch = self._torch
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        rows = self._method(METHOD_TOKEN_EMBEDDING).execute([torch.from_numpy(ids[None].copy())])[0]
        for token_id, features in ((self.image_token_id, image_features), (self.audio_token_id, audio_features)):
            if features is not None:
                slots = torch.from_numpy(ids == token_id)
                rows[0, slots] = torch.as_tensor(features, dtype=rows.dtype)
        cache_position = torch.arange(self._position, self._position + len(ids), dtype=torch.long)
        logits = self._method(METHOD_TEXT_DECODER).execute([rows, cache_position])[0]
        self._position += len(ids)
        if len(ids) > 1:
            release_free_heap()  # the prefill's freed buffers (runtimes/free_heap.py)
        return logits.reshape(-1, logits.shape[-1]).float().numpy()

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        budget_patches = int(self.manifest.method(METHOD_VISION_ENCODER).inputs[0].shape[1])
        pixels = np.zeros((1, budget_patches, pixel_values.shape[-1]), np.float32)
        positions = np.full((1, budget_patches, 2), -1, np.int64)
        n = min(pixel_values.shape[1], budget_patches)
        pixels[:, :n], positions[:, :n] = pixel_values[:, :n], position_ids[:, :n]
        tokens, valid = self._method(METHOD_VISION_ENCODER).execute(
            [self._torch.from_numpy(pixels), self._torch.from_numpy(positions)])
        release_free_heap()  # the encoder's freed buffers
        return tokens[0][valid[0].bool()].float().numpy()

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        padded, padded_mask = pad_audio_frames(features, mask,
                                               extra=self.manifest.method(METHOD_AUDIO_ENCODER).extra)
        tokens, valid = self._method(METHOD_AUDIO_ENCODER).execute(
            [self._torch.from_numpy(padded), self._torch.from_numpy(padded_mask)])
        release_free_heap()
        return tokens[0][valid[0].bool()].float().numpy()


def _runtime_without_compiler():
    """executorch.runtime, without running the executorch.exir package (the ahead-of-time
    compiler, torchao with it: +129 MiB and 2.5 s of imports, bench/RESULTS.md section 11).
    The pybindings import only `executorch.exir._warnings` from it, a decorator module that
    needs nothing of the package, so a bare package object stands in while they import; a
    later import of the compiler in this process runs the real package."""
    if "executorch.exir" in sys.modules:
        return require("executorch.runtime", extra="executorch")
    try:
        spec = importlib.util.find_spec("executorch.exir")  # locates it without running it
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return require("executorch.runtime", extra="executorch")
    bare = types.ModuleType("executorch.exir")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["executorch.exir"] = bare
    try:
        return require("executorch.runtime", extra="executorch")
    finally:
        if sys.modules.get("executorch.exir") is bare:
            del sys.modules["executorch.exir"]
            sys.modules.pop("executorch.exir._warnings", None)


@contextmanager
def _native_logs_hidden() -> Iterator[None]:
    """Silence file descriptor 2 while ExecuTorch loads a method, when the CLI asks
    (EDGEKIT_NATIVE_LOGS=hide; `--debug` leaves it): XNNPACK's first load logs a page of CPU
    probing from C++ that would bury the CLI's one-line messages. Failures still raise."""
    if os.environ.get("EDGEKIT_NATIVE_LOGS") != "hide":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
