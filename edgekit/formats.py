"""Bundle formats: one entry each, naming its exporter, its runtime backend, its recipes.

Adding a format means one folder under export/ (its exporter), one under
runtimes/backends/ (its runner, if it runs off-device here) and one entry in FORMATS.
Everything else derives from the table: `edgekit.export.exporter_for`,
`edgekit.runtimes.backends.open_backend`, the manifest's format enum, the JSON Schema's
enum, the CLI's choices, and the checks of devices.yaml. Recipes stay backend-agnostic
(edgekit.recipes); here a format says which of them its exporter and runtime honour.

Exporters and backends are named as "module:attribute" and imported on use, so the
table itself stays torch-free and the device side never imports the host side.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from edgekit.errors import InputError, MissingDependencyError, NotAvailableError, install_line
from edgekit.recipes import RECIPES
from edgekit.registry import Registry


@dataclass(frozen=True)
class Backend:
    """A runtime backend of a format.

    `execution_providers`: the ONNX Runtime EPs it may use, in priority order (the default
    list when a profile of another format is exported to this one).
    """

    name: str
    execution_providers: tuple[str, ...] = ()
    recipes: tuple[str, ...] = ()  # the format's recipes this backend takes (empty: all of them)


@dataclass(frozen=True, kw_only=True)
class Format:
    name: str
    description: str
    extension: str
    backends: tuple[Backend, ...]
    recipes: tuple[str, ...]
    default_recipe: str
    # "module:function" of the exporter, an edgekit.export.Exporter; None: none yet (the reason says why).
    exporter: str | None
    # "module:Class" of the runtime backend, an edgekit.runtimes.backends.Backend; None: runs elsewhere.
    runtime: str | None
    # Why `exporter` or `runtime` is None: the one line a user gets.
    unavailable: str = ""
    runtime_extra: str = ""  # the install extra the runtime needs beyond the base package
    # "module:function" that checks a bundle's files against its manifest on load and returns
    # (the context the decoder was exported for, where that is written), or None.
    exported_files_check: str | None = None
    # What the runtime holds the KV cache in, whatever the recipe: ONNX graphs keep fp32
    # inputs/outputs (fp16 graphs too: keep_io_types), the .pte's cache buffers are fp32,
    # Core ML states are fp16.
    kv_cache_bits: int = 32
    # Sliding layers' cache slots beyond the window: ExecuTorch's ring buffer takes a whole
    # prefill chunk past the window (window + chunk - 1 slots).
    ring_takes_a_chunk: bool = False
    # The KV cache is buffers sized to the context, made when the decoder is built for export
    # (a .pte's, Core ML's states); an ONNX graph's grows at run time instead.
    kv_cache_built_at_export: bool = False
    # "module:function" (bundle -> Backend) that `edgekit verify` uses instead of `runtime`:
    # for a format whose runtime needs hardware this machine lacks. None: `runtime`.
    verify_runtime: str | None = None
    # "module:function" (plan -> bytes): the host memory an export peaks at, where the exporter's
    # own tools make that the limit (coremltools' conversion); None: not estimated.
    export_memory: str | None = None
    # `--external-weights`: the weights can move to a data file beside the program.
    external_weights: bool = False
    # The vision encoder's attention runs a block of queries at a time (edgekit.compute_shapes.vision_query_chunk).
    vision_query_chunked: bool = False
    # The format's stock runner feeds each input (a text piece, an image's soft tokens, a clip's)
    # to the decoder in one call (ExecuTorch's MultimodalRunner), so the decoder takes at least
    # an image's worth of tokens per call (edgekit.compute_shapes.prefill_chunk).
    feeds_inputs_whole: bool = False

    def __post_init__(self) -> None:
        if (self.exporter is None or self.runtime is None) and not self.unavailable:
            raise ValueError(f"format {self.name}: say why it has no exporter or runtime (unavailable=...)")
        # A typo here would surface only when a user picks the recipe: fail at import.
        for name in (*self.recipes, self.default_recipe):
            RECIPES.get(name)
        if self.default_recipe not in self.recipes:
            raise ValueError(f"format {self.name}: default recipe {self.default_recipe!r} is not in its recipes")
        for backend in self.backends:
            if not set(backend.recipes) <= set(self.recipes):
                raise ValueError(f"format {self.name}: backend {backend.name} lists recipes the format does not")

    @property
    def backend_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise InputError(f"format {self.name} has no backend {name!r}; choose one of: {', '.join(self.backend_names)}")

    @property
    def uses_execution_providers(self) -> bool:
        return any(b.execution_providers for b in self.backends)

    def supports(self, recipe: str) -> bool:
        return recipe in self.recipes

    def recipes_for(self, backend: str) -> tuple[str, ...]:
        """The recipes `backend` can run, in the format's order (its default first when it can)."""
        return self.backend(backend).recipes or self.recipes

    def default_recipe_for(self, backend: str) -> str:
        allowed = self.recipes_for(backend)
        return self.default_recipe if self.default_recipe in allowed else allowed[0]

    def load_exporter(self) -> Any:
        if self.exporter is None:
            raise NotAvailableError(f"no {self.name} exporter: {self.unavailable}")
        return _import(self.exporter, what=f"the {self.name} exporter", extra="export")

    def load_runtime(self) -> Any:
        if self.runtime is None:
            raise NotAvailableError(f"{self.name} bundles do not run here: {self.unavailable}")
        return _import(self.runtime, what=f"the {self.name} runtime", extra=self.runtime_extra)

    def load_verify_runtime(self) -> Any:
        """What `edgekit verify` opens a bundle with: a callable (bundle, providers=, threads=) -> Backend."""
        if self.verify_runtime is None:
            return self.load_runtime()
        return _import(self.verify_runtime, what=f"the {self.name} program check", extra="export")

    def export_memory_bytes(self, plan: Any) -> int | None:
        if self.export_memory is None:
            return None
        return _import(self.export_memory, what=f"the {self.name} export memory estimate", extra="")(plan)

    def check_exported_files(self, root: Any, manifest: Any) -> tuple[int, str] | None:
        if self.exported_files_check is None:
            return None
        return _import(self.exported_files_check, what=f"the {self.name} bundle check", extra="")(root, manifest)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "extension": self.extension, "backends": list(self.backend_names),
                "recipes": list(self.recipes), "default_recipe": self.default_recipe}


_INT4 = ("int4", "int4-b64", "int4-b128", "int4-head128")

FORMATS: Registry[Format] = Registry("format", (
    Format(
        name="onnx",
        description="ONNX graphs + external data, run by ONNX Runtime (Pi: CPU; Jetson: CUDA / TensorRT)",
        extension=".onnx",
        backends=(
            Backend("cpu", ("CPUExecutionProvider",)),
            Backend("cuda", ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
        ),
        # MatMulNBits int4 (docs/export-notes.md: 4x faster than fp32 decode at E2B width).
        recipes=("fp32", "fp16", "int8", *_INT4, "int4-ple2"),
        default_recipe="int4",
        exporter="edgekit.export.onnx.exporter:export_onnx",
        runtime="edgekit.runtimes.backends.onnx_backend:OnnxBackend",
        exported_files_check="edgekit.runtimes.backends.onnx_files:check_exported_files",
    ),
    Format(
        name="executorch",
        description="one multi-method .pte for the ExecuTorch runtime (Android AAR, C++, Python with torch)",
        extension=".pte",
        backends=(
            # No weight-only linear recipes: IntxWeightOnlyConfig gives wrong outputs on XNNPACK
            # and no smaller file (docs/export-notes.md).
            Backend("xnnpack", recipes=("fp32", "8da4w", "8da4w-g64", "8da4w-g128", "8da8w", "8da4w-emb4", "8da4w-ple2")),
        ),
        recipes=("fp32", "8da4w", "8da4w-g64", "8da4w-g128", "8da8w", "8da4w-emb4", "8da4w-ple2"),
        default_recipe="8da4w-emb4",
        exporter="edgekit.export.executorch.exporter:export_executorch",
        runtime="edgekit.runtimes.backends.executorch_backend:ExecutorchBackend",
        runtime_extra="executorch",
        exported_files_check="edgekit.runtimes.backends.executorch_program:check_exported_files",
        ring_takes_a_chunk=True,
        kv_cache_built_at_export=True,
        external_weights=True,
        vision_query_chunked=True,
        feeds_inputs_whole=True,
    ),
    Format(
        name="coreml",
        description="stateful .mlpackage programs for Core ML (iOS 18 / macOS 15 states hold the KV cache), "
                    "embedding tables as memory-mapped row files",
        extension=".mlpackage",
        backends=(Backend("coreml"),),
        # linear_quantize_weights: int8 per block or channel, int4 per block (export/coreml/
        # quantize.py); the tables are edgekit's row files, which take int2 rows too (*-ple2*).
        recipes=("fp32", "fp16", "int8", "int8-channel", *_INT4, "int4-ple2", "int4-ple2-t8"),
        default_recipe="int4",
        exporter="edgekit.export.coreml.exporter:export_coreml",
        runtime="edgekit.runtimes.backends.coreml_backend:CoreMLBackend",
        runtime_extra="coreml",
        # Off Apple hardware `verify` evaluates the saved programs in numpy instead of running them.
        verify_runtime="edgekit.export.coreml.program_check:backend_for_verify",
        export_memory="edgekit.export.coreml.conversion_memory:conversion_peak_bytes",
        kv_cache_bits=16,
        ring_takes_a_chunk=True,
        kv_cache_built_at_export=True,
    ),
))


def _import(target: str, *, what: str, extra: str) -> Any:
    module, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs a package that is not installed ({exc}); install it with: "
                                     f"{install_line(extra)}") from None


def get_format(name: str) -> Format:
    """Look a format up by name; unknown names list the known ones (InputError)."""
    return FORMATS.get(name)
