"""Saved Core ML ML programs (.mlpackage) evaluated op by op in numpy, where Core ML cannot run.

Core ML predicts only on Apple platforms. On Linux, `edgekit verify` checks a Core ML bundle
by reloading its ML program with coremltools' MIL loader and evaluating every op here:

    .mlpackage ──coremltools milproto loader──► Program: functions of ops over Vars
        ──_compile_function──► consts as numpy, once (compressed weights decompressed:
        │                      mil_weights.py; ops whose value the loader already knows kept
        │                      as consts), one _Step per remaining op (mil_numpy_ops.HANDLERS)
        ──SavedProgram.run──► env (name -> ndarray) filled op by op; states written in place

The program's own dtypes are kept: an fp16 program computes in float16, as the device does,
except that matmul / linear / conv / reductions / softmax / norms accumulate in float32 and
are cast to the op's output dtype (mil_numpy_ops.py says which). An op type without a
handler fails the load with NotImplementedError naming every such type; nothing is skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import InputError, require
from edgekit.export.coreml import mil_weights
from edgekit.export.coreml.mil_numpy_ops import HANDLERS, Handler

# Inputs that the handlers read as float32 anyway: a float16 const read through these is
# widened once when the program loads, not on every call (casting a 262144 x 1536 lm_head
# weight takes longer than the matmul). A const also read elsewhere (a tied embedding's
# gather) keeps its float16 copy there.
_FLOAT32_INPUTS = frozenset({
    ("linear", "x"), ("linear", "weight"), ("linear", "bias"),
    ("matmul", "x"), ("matmul", "y"),
    ("conv", "weight"), ("conv", "bias"),
})

# Ops never folded into consts although the loader may know their output: they touch states.
_STATEFUL_OPS = frozenset({"read_state", "coreml_update_state"})


@dataclass(frozen=True)
class _Ref:
    """An op input known only at run time: a function input, a state or an op's output."""

    name: str


@dataclass(frozen=True)
class _Step:
    """One op, ready to run: its handler, inputs by parameter and what its outputs must be."""

    op_type: str
    op_name: str
    handler: Handler
    fixed: dict[str, Any]  # const inputs, as numpy, by parameter
    refs: tuple[tuple[str, str], ...]  # (parameter, name of a run-time value)
    ref_lists: tuple[tuple[str, tuple[Any, ...]], ...]  # (parameter, items: _Ref or const)
    outputs: tuple[str, ...]
    dtypes: tuple[np.dtype, ...]
    shapes: tuple[tuple[int, ...] | None, ...]  # None where the program's shape is flexible


@dataclass(frozen=True)
class _Function:
    inputs: dict[str, tuple[tuple[int | None, ...], np.dtype]]  # non-state, in order; None: flexible dim
    states: dict[str, tuple[tuple[int, ...], np.dtype]]
    steps: tuple[_Step, ...]
    consts: dict[str, Any]  # by Var name, for outputs that are consts
    outputs: tuple[str, ...]


class SavedProgram:
    """One saved .mlpackage (all its functions), evaluated op by op in numpy."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        program = _load_program(self.path)
        self._functions = {name: _compile_function(name, function) for name, function in program.functions.items()}

    @property
    def function_names(self) -> tuple[str, ...]:
        return tuple(self._functions)

    def input_names(self, function: str = "main") -> tuple[str, ...]:
        """Non-state inputs, in the program's order."""
        return tuple(self._function(function).inputs)

    def output_names(self, function: str = "main") -> tuple[str, ...]:
        return self._function(function).outputs

    def op_types(self, function: str = "main") -> set[str]:
        """The MIL op types a function evaluates (consts folded away)."""
        return {step.op_type for step in self._function(function).steps}

    def state_specs(self, function: str = "main") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """State name -> (shape, dtype)."""
        return dict(self._function(function).states)

    def new_states(self, function: str = "main") -> dict[str, np.ndarray]:
        """Zero-filled arrays, one per state (a fresh MLState)."""
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._function(function).states.items()}

    def run(self, function: str, inputs: dict[str, np.ndarray],
            states: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Outputs by name. `states` arrays are updated IN PLACE by coreml_update_state (as Core ML's MLState is)."""
        fn = self._function(function)
        env = _bind_inputs(fn, inputs)
        env.update(_bind_states(fn, self.new_states(function) if states is None else states))
        # overflow to inf in an fp16 program is what the device does too; no warnings per op
        with np.errstate(all="ignore"):
            for step in fn.steps:
                args = dict(step.fixed)
                for param, name in step.refs:
                    args[param] = env[name]
                for param, items in step.ref_lists:
                    args[param] = [env[item.name] if isinstance(item, _Ref) else item for item in items]
                try:
                    result = step.handler(args)
                except Exception as exc:
                    raise RuntimeError(f"MIL op {step.op_type} {step.op_name!r} failed in numpy: {exc}") from exc
                results = result if isinstance(result, tuple) else (result,)
                for name, value, dtype, shape in zip(step.outputs, results, step.dtypes, step.shapes, strict=True):
                    value = np.asarray(value)
                    if value.dtype != dtype:
                        value = value.astype(dtype)
                    if shape is not None and value.shape != shape:
                        raise RuntimeError(f"MIL op {step.op_type} {step.op_name!r} gave shape {value.shape}, "
                                           f"the program says {shape}")
                    env[name] = value
        return {name: env[name] if name in env else fn.consts[name] for name in fn.outputs}

    def _function(self, name: str) -> _Function:
        try:
            return self._functions[name]
        except KeyError:
            raise InputError(f"{self.path} has no function {name!r} (it has: {', '.join(self._functions)})") from None


# --- loading ----------------------------------------------------------------------------


def _load_program(path: Path) -> Any:
    """The pymil Program of a saved .mlpackage (every function of a multifunction one)."""
    ct = require("coremltools", extra="export")
    from coremltools.converters.mil.frontend.milproto.load import load

    if not path.is_dir():
        raise InputError(f"{path} is not a saved .mlpackage")
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise InputError(f"{path} holds a {spec.WhichOneof('Type')} model, not an ML program")
    return load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def _numpy_dtype(var: Any) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


def _static_shape(var: Any) -> tuple[int, ...] | None:
    shape = tuple(var.shape)
    return shape if all(isinstance(d, (int, np.integer)) for d in shape) else None


def _const_value(var: Any, value: Any) -> Any:
    """A known value as numpy in its Var's dtype (strings stay str: modes, pad types)."""
    from coremltools.converters.mil.mil import types

    if types.is_str(var.dtype):
        return str(value)
    return np.asarray(value).astype(_numpy_dtype(var), copy=False)


def _compile_function(name: str, function: Any) -> _Function:
    from coremltools.converters.mil.mil import types

    consts = _fold_consts(function)
    widened: dict[str, np.ndarray] = {}
    steps = []
    unknown: Counter[str] = Counter()
    for op in function.operations:
        if all(var.name in consts for var in op.outputs):
            continue
        handler = HANDLERS.get(op.op_type)
        if handler is None or op.blocks:  # control flow (cond, while_loop) is not evaluated
            unknown[op.op_type] += 1
            continue
        steps.append(_step(op, handler, consts, widened))
    if unknown:
        listed = ", ".join(f"{op_type} (x{count})" for op_type, count in sorted(unknown.items()))
        raise NotImplementedError(f"function {name!r} has MIL ops with no numpy evaluation: {listed}")

    inputs, states = {}, {}
    for input_name, var in function.inputs.items():
        if types.is_state(var.sym_type):
            states[input_name] = (tuple(int(d) for d in var.shape), _numpy_dtype(var))
        else:
            inputs[input_name] = (tuple(d if isinstance(d, (int, np.integer)) else None for d in var.shape),
                                  _numpy_dtype(var))
    outputs = tuple(var.name for var in function.outputs)
    # the steps hold the consts they read; keeping only returned ones lets the rest (the
    # compressed data, float16 weights read only as float32) be freed
    return _Function(inputs=inputs, states=states, steps=tuple(steps),
                     consts={name: consts[name] for name in outputs if name in consts}, outputs=outputs)


def _fold_consts(function: Any) -> dict[str, Any]:
    """Var name -> numpy value for every value known at load: const ops, compressed weights
    (decompressed) and ops whose outputs the loader's value inference already computed."""
    consts: dict[str, Any] = {}
    for op in function.operations:
        outputs = op.outputs
        if op.op_type.startswith("constexpr_"):
            args = {param: consts[var.name] for param, var in op.inputs.items()}
            values = mil_weights.decompress(op, args, tuple(_numpy_dtype(var) for var in outputs))
        elif op.op_type not in _STATEFUL_OPS and not op.blocks and all(var.val is not None for var in outputs):
            values = tuple(var.val for var in outputs)
        else:
            continue
        for var, value in zip(outputs, values, strict=True):
            consts[var.name] = _const_value(var, value)
    return consts


def _step(op: Any, handler: Handler, consts: dict[str, Any], widened: dict[str, np.ndarray]) -> _Step:
    """`widened`: float32 copies of float16 consts, shared by the steps that read them wide."""
    fixed: dict[str, Any] = {}
    refs: list[tuple[str, str]] = []
    ref_lists: list[tuple[str, tuple[Any, ...]]] = []
    for param, value in op.inputs.items():
        if isinstance(value, (list, tuple)):
            items = tuple(consts[var.name] if var.name in consts else _Ref(var.name) for var in value)
            if any(isinstance(item, _Ref) for item in items):
                ref_lists.append((param, items))
            else:
                fixed[param] = list(items)
        elif value.name in consts:
            const = consts[value.name]
            if (op.op_type, param) in _FLOAT32_INPUTS and getattr(const, "dtype", None) == np.float16:
                if value.name not in widened:
                    widened[value.name] = const.astype(np.float32)  # exact
                const = widened[value.name]
            fixed[param] = const
        else:
            refs.append((param, value.name))
    return _Step(op_type=op.op_type, op_name=op.name, handler=handler, fixed=fixed, refs=tuple(refs),
                 ref_lists=tuple(ref_lists), outputs=tuple(var.name for var in op.outputs),
                 dtypes=tuple(_numpy_dtype(var) for var in op.outputs),
                 shapes=tuple(_static_shape(var) for var in op.outputs))


# --- binding a call's inputs and states --------------------------------------------------


def _bind_inputs(fn: _Function, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    missing = [name for name in fn.inputs if name not in inputs]
    unexpected = [name for name in inputs if name not in fn.inputs]
    if missing or unexpected:
        raise InputError(f"inputs {sorted(inputs)} do not match the program's {list(fn.inputs)}"
                         + (f" (missing {missing})" if missing else "")
                         + (f" (unexpected {unexpected})" if unexpected else ""))
    env: dict[str, Any] = {}
    for name, (shape, dtype) in fn.inputs.items():
        value = np.asarray(inputs[name]).astype(dtype, copy=False)  # as Core ML converts an MLMultiArray
        if value.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, value.shape)):
            declared = tuple("?" if d is None else d for d in shape)
            raise InputError(f"input {name!r} has shape {value.shape}; the program takes {declared}")
        env[name] = value
    return env


def _bind_states(fn: _Function, states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    bound = {}
    for name, (shape, dtype) in fn.states.items():
        array = states.get(name)
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype \
                or not array.flags.writeable:
            raise InputError(f"state {name!r} must be a writable {dtype} array of shape {shape} "
                             f"(it is updated in place); use new_states()")
        bound[name] = array
    return bound
