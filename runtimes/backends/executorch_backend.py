"""ExecuTorch backend: the .pte's KV cache lives in text_decoder's mutable buffers.

ExecuTorch's Python bindings link libtorch, so this module (and only this one) imports
torch, on first use; `pip install 'gemma-edgekit[executorch]'` brings both. Method names and
the packed embedding layout (input embedding + per-layer-embedding rows side by side)
are those of export/executorch/methods.py, read back from the manifest.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.bundle import Bundle
from edgekit.errors import BundleError, InputError, NotAvailableError, require
from edgekit.runtimes.free_heap import release_free_heap
from edgekit.runtimes.image_preprocess import ImageParams, image_from_patches
from edgekit.runtimes.mapped_pages import advise_random_access
from edgekit.runtimes.native_logs import native_logs_hidden
from edgekit.runtimes.no_mlock import mlock_disabled
from edgekit.manifest import METHOD_AUDIO_ENCODER, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, METHOD_VISION_ENCODER


class ExecutorchBackend:
    def __init__(self, bundle: Bundle, *, providers: tuple[str, ...] | None = None,
                 threads: int | None = None) -> None:
        # `providers` are ONNX Runtime's; a .pte's delegates were chosen at export.
        self.bundle = bundle
        self.manifest = bundle.manifest
        self._torch = require("torch", extra="executorch")
        _runtime_without_compiler()  # the bindings, without the compiler package they would import
        try:  # quantized embedding kernels register themselves on import (docs/export-notes.md)
            import executorch.kernels.quantized  # noqa: F401
        except ImportError:
            pass
        if needs_llm_ops(self.manifest):
            _load_llm_kernels()
        # ExecuTorch's Module, as its C++ LLM runners hold a program: each method gets planned
        # memory of its own when first run. (runtime.Runtime's programs give all their
        # methods one set of arenas, sized to the largest method and allocated at load:
        # text_decoder keeps its KV cache there, and an encoder call overwrote it.)
        from executorch.extension.pybindings import portable_lib

        pte = bundle.file(self.manifest.method(METHOD_TEXT_DECODER).file)
        data = self.manifest.extra.get("program_data")  # the weights, when exported with --external-weights
        try:
            with mlock_disabled():  # as root, the bindings would lock every segment they load
                self._module = portable_lib._load_for_executorch(
                    str(pte), data_path=str(bundle.file(data)) if data else None,
                    program_verification=portable_lib.Verification.Minimal)
        except Exception as exc:
            raise BundleError(f"cannot load {pte.name}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        self._methods: dict[str, _Method] = {}
        self._program_files = [pte] + ([bundle.file(data)] if data else [])
        # Load token_embedding with a one-token lookup, so the tables' mappings exist and are
        # marked random-access (_Method) before the first real lookup reads around its rows.
        self._method(METHOD_TOKEN_EMBEDDING).execute([self._torch.zeros(1, 1, dtype=self._torch.long)])
        decoder = self.manifest.method(METHOD_TEXT_DECODER)
        self.max_prefill_tokens = int(decoder.extra.get("max_seq_len", 1))
        self.image_token_id = self.manifest.special_tokens.image_token_id
        self.audio_token_id = self.manifest.special_tokens.audio_token_id
        self.reset()

    def _method(self, name: str) -> "_Method":
        if name not in self._methods:
            if not self.manifest.has_method(name):
                raise BundleError(f"bundle {self.bundle.path} has no {name} method")
            self._methods[name] = _Method(self._module, name, self.bundle.path.name, on_load=self._advise_random)
        return self._methods[name]

    def _advise_random(self) -> None:
        """Table rows are read by token id: no read-ahead around them (runtimes/mapped_pages.py).
        A method maps the program's segments when it loads, so this runs after each load."""
        for file in self._program_files:
            advise_random_access(file)

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

    def mark_turn_start(self, position: int | None) -> None:
        pass  # the ring buffer cannot keep older rows; a turn that goes back is fed again

    def forward(self, input_ids: np.ndarray, *, image_features: np.ndarray | None = None,
                audio_features: np.ndarray | None = None) -> np.ndarray:
        torch = self._torch
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        # The program would fail inside a kernel (or, without the LLM ops, write past its cache).
        if len(ids) > self.max_prefill_tokens:
            raise InputError(f"{len(ids)} tokens in one call; this program takes at most {self.max_prefill_tokens} "
                             "(feed longer prompts in chunks)")
        if self._position + len(ids) > self.manifest.max_context:
            raise InputError(f"{self._position} cached + {len(ids)} new tokens pass this bundle's context of "
                             f"{self.manifest.max_context} tokens")
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

    # The encoders take what ExecuTorch's stock runner passes (export/executorch/methods.py):
    # the resized uint8 image and the clip's real log-mel frames, bins first.
    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        params = ImageParams.from_dict(self.manifest.image_preprocessing.model_dump())
        image = image_from_patches(pixel_values, position_ids, params=params)
        tokens = self._method(METHOD_VISION_ENCODER).execute([self._torch.from_numpy(image[None])])[0]
        release_free_heap()  # the encoder's freed buffers
        return tokens[0].float().numpy()

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        real = np.asarray(features, np.float32).reshape(-1, features.shape[-1])[np.asarray(mask, bool).reshape(-1)]
        if len(real) == 0:
            raise InputError("the audio clip has no log-mel frames (too short)")
        tokens = self._method(METHOD_AUDIO_ENCODER).execute(
            [self._torch.from_numpy(np.ascontiguousarray(real.T[None]))])[0]
        release_free_heap()
        return tokens[0].float().numpy()


class _Method:
    """One method of a loaded Module: `execute(inputs)` -> outputs (copies). The Module loads
    a method on its first run, so that run is where loading errors surface."""

    def __init__(self, module, name: str, bundle_name: str, *, on_load: Callable[[], None]) -> None:
        self._module, self._name, self._bundle_name, self._on_load = module, name, bundle_name, on_load
        self._loaded = False

    def execute(self, inputs: list) -> list:
        if self._loaded:
            return self._module.run_method(self._name, inputs)
        try:
            with native_logs_hidden(), mlock_disabled():
                outputs = self._module.run_method(self._name, inputs)
        except RuntimeError as exc:  # e.g. an operator this runtime build lacks
            raise BundleError(f"cannot load or run method {self._name} of {self._bundle_name}: "
                              f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
        self._loaded = True
        self._on_load()
        return outputs


LLM_OPS_NAMESPACE = "llama::"  # ExecuTorch's LLM custom ops (export/executorch/llm_ops.py)


def needs_llm_ops(manifest) -> bool:
    """Whether a bundle's program calls ExecuTorch's LLM custom ops (the manifest lists the
    kernels each method leaves outside its delegates)."""
    return any(kernel.startswith(LLM_OPS_NAMESPACE) for method in manifest.methods
               for kernel in method.extra.get("kernels", ()))


def llm_ops_library() -> Path | None:
    """The executorch wheel's library with the LLM custom ops' kernels (update_cache,
    custom_sdpa): its ahead-of-time library, which links libtorch; None if not installed."""
    try:
        spec = importlib.util.find_spec("executorch.extension.llm.custom_ops")
    except ImportError:
        spec = None
    folders = (spec.submodule_search_locations or []) if spec else []
    found = [path for folder in folders for path in sorted(Path(folder).glob("*custom_ops_aot_lib.*"))]
    return found[0] if found else None


def _load_llm_kernels() -> None:
    """Register the LLM custom ops' kernels with the runtime: libtorch is loaded already (the
    bindings link it); the library's Python module would also import torch's compiler stack."""
    library = llm_ops_library()
    if library is None:
        raise NotAvailableError("this bundle's text_decoder calls ExecuTorch's LLM custom ops "
                                "(llama::custom_sdpa), which this executorch install does not ship")
    require("torch", extra="executorch").ops.load_library(str(library))


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
