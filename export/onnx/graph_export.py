"""Export one component to an ONNX graph with named inputs, outputs and dynamic dims.

torch.onnx's dynamo exporter names dynamic dims after its symbols (s23, s53); runtimes
and people read names like batch_size / sequence_length, so they are renamed after export.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from edgekit.errors import ExportError

OPSET = 21


@dataclass(frozen=True)
class GraphSpec:
    """What to export: a module, sample args, names, and which axes are dynamic."""

    name: str
    module: torch.nn.Module
    args: tuple[Any, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # io name -> {axis: dim name}; axes not listed are static.
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # torch.export dynamic_shapes when dims are related (audio frames = 4 x tokens);
    # otherwise built from dynamic_axes with Dim.DYNAMIC.
    dynamic_shapes: tuple[Any, ...] | None = None
    # Trace with strict torch.export first: the non-strict trace torch.onnx runs itself
    # spends tens of minutes in sympy on the real-width audio conformer's chunk arithmetic.
    strict: bool = False


def _dynamic_shapes(spec: GraphSpec) -> tuple[Any, ...] | None:
    """torch.export wants the args' structure; names map flat inputs onto it."""
    if spec.dynamic_shapes is not None:
        return spec.dynamic_shapes
    if not spec.dynamic_axes:
        return None
    flat_names = iter(spec.input_names)

    def shape_for(arg: Any) -> Any:
        if isinstance(arg, (tuple, list)):
            return type(arg)(shape_for(a) for a in arg)
        axes = spec.dynamic_axes.get(next(flat_names), {})
        return {axis: torch.export.Dim.DYNAMIC for axis in axes} or None

    return tuple(shape_for(a) for a in spec.args)


def export_graph(spec: GraphSpec, path: Path, *, external_data: bool = True) -> Path:
    """Write `spec` to `path` (+ `path.data` for weights). Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)  # onnx appends to an existing .data file
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(quiet):
            model, args = spec.module, spec.args
            if spec.strict:
                model = torch.export.export(model, args, dynamic_shapes=_dynamic_shapes(spec), strict=True)
                args = ()
            torch.onnx.export(
                model, args, str(path), input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=None if spec.strict else _dynamic_shapes(spec),
                dynamo=True, opset_version=OPSET, external_data=external_data,
            )
    except Exception as exc:  # torch's own error is pages long: keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of {spec.name} failed: {first}") from exc
    finally:
        _release_onnxscript_matchers()
    _name_dynamic_dims(path, spec.dynamic_axes)
    return path


def _release_onnxscript_matchers() -> None:
    """onnxscript 0.7's rewrite rules (which torch.onnx runs on every graph) are module-level
    objects whose SimplePatternMatcher keeps the last graph it matched, and through it every
    weight of the traced module: at full E2B depth the decoder's 9 GB of fp32 weights would
    outlive the export and sit beside the quantizer. Drop those references."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # a later onnxscript: nothing known to clear
        return
    for obj in gc.get_objects():
        try:
            matcher = isinstance(obj, SimplePatternMatcher)
        except ReferenceError:  # a weakref proxy whose object is gone (isinstance reads its class)
            continue
        if matcher:
            for attr in ("_graph", "_current_node", "_tracer", "_match"):
                if attr in obj.__dict__:
                    obj.__dict__[attr] = None


def _name_dynamic_dims(path: Path, dynamic_axes: dict[str, dict[int, str]]) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in dynamic_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = name
    onnx.save(model, str(path))
