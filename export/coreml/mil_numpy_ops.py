"""numpy handlers for MIL ops, one per op type: HANDLERS is the table mil_eval.py dispatches on
(this module's arithmetic ops plus mil_layout_ops.LAYOUT_HANDLERS, the data-movement ones).

A handler takes the op's inputs by parameter name (numpy arrays, numpy scalars, strings,
lists of arrays for tuple inputs; optional inputs the program left out are absent) and
returns its output, or a tuple of outputs. The caller casts each output to the dtype of the
op's output Var, so a handler may compute wider than the program:

- elementwise ops run in the input dtype (an fp16 program rounds to fp16 after each op,
  as the device does);
- matmul, linear, conv, einsum, attention, reductions, softmax, norms and the composite
  activations (gelu, silu, ...) run in float32: devices accumulate wider than fp16, and
  numpy's float16 matmul is slow.

Semantics follow coremltools 9.0's op definitions (converters/mil/mil/ops/defs/iOS15..18).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.export.coreml.mil_layout_ops import LAYOUT_HANDLERS, Args, Handler, axes_of


def _f32(x: Any) -> np.ndarray:
    """float16 -> float32 for the ops that accumulate wider; other dtypes as they are."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


# --- elementwise ------------------------------------------------------------------------


def _binary(fn: Callable) -> Handler:
    return lambda a: fn(a["x"], a["y"])


def _unary(fn: Callable) -> Handler:
    return lambda a: fn(a["x"])


def _unary_f32(fn: Callable) -> Handler:
    return lambda a: fn(_f32(a["x"]))


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc with relative error < 1.2e-7 everywhere (Numerical Recipes' erfcc, a Chebyshev
    fit); numpy has no erf, and relative accuracy in the tails keeps gelu's small outputs right."""
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    tail = t * np.exp(-z * z + poly)
    return np.where(x >= 0, tail, 2.0 - tail)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(a: Args) -> np.ndarray:
    x = _f32(a["x"])
    mode = str(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * _erfc(-x / np.sqrt(2.0))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise ValueError(f"unknown gelu mode {mode!r}")


def _prelu(a: Args) -> np.ndarray:
    x = a["x"]
    alpha = np.asarray(a["alpha"]).reshape((1, -1) + (1,) * (x.ndim - 2))  # per channel, axis 1
    return np.where(x >= 0, x, alpha * x)


def _softplus_parametric(a: Args) -> np.ndarray:
    x = _f32(a["x"])
    shape = (1, -1) + (1,) * (x.ndim - 2)  # alpha, beta per channel, axis 1
    return _f32(a["alpha"]).reshape(shape) * np.logaddexp(0.0, _f32(a["beta"]).reshape(shape) * x)


def _clamped_relu(a: Args) -> np.ndarray:
    x = a["x"]
    return np.minimum(np.where(x >= 0, x, a["alpha"] * x), a["beta"])


# --- linear algebra ---------------------------------------------------------------------


def _swap_last(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2) if x.ndim >= 2 else x


def _matmul(a: Args) -> np.ndarray:
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x", False):
        x = _swap_last(x)
    if a.get("transpose_y", False):
        y = _swap_last(y)
    return np.matmul(x, y)


def _linear(a: Args) -> np.ndarray:
    out = np.matmul(_f32(a["x"]), _f32(a["weight"]).T)  # weight: [out, in]
    bias = a.get("bias")
    return out if bias is None else out + _f32(bias)


def _einsum(a: Args) -> np.ndarray:
    return np.einsum(str(a["equation"]), *(_f32(v) for v in a["values"]), optimize=True)


def _softmax_f32(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def _softmax(a: Args) -> np.ndarray:
    return _softmax_f32(_f32(a["x"]), int(a.get("axis", -1)))


def _scaled_dot_product_attention(a: Args) -> np.ndarray:
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(np.float32(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f32(mask)
    return np.matmul(_softmax_f32(scores, -1), v)


# --- convolution ------------------------------------------------------------------------


def _conv_pads(a: Args, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
               dilations: list[int]) -> list[tuple[int, int]]:
    """(before, after) per spatial dim. "same": output ceil(in / stride), the odd pad after
    ("same_lower": before), the TensorFlow convention that MIL documents."""
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = [int(p) for p in np.asarray(a.get("pad", [0] * 2 * len(spatial))).ravel()]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"unknown conv pad_type {pad_type!r}")
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


def _conv(a: Args) -> np.ndarray:
    """1-D/2-D/3-D grouped convolution (weight [C_out, C_in / groups, *K]): strided windows of
    the padded input, multiplied with the weight per group."""
    x, w = _f32(a["x"]), _f32(a["weight"])
    nd = x.ndim - 2
    kernel = w.shape[2:]
    strides = [int(s) for s in np.asarray(a.get("strides", [1] * nd)).ravel()]
    dilations = [int(d) for d in np.asarray(a.get("dilations", [1] * nd)).ravel()]
    groups = int(a.get("groups", 1))
    pads = _conv_pads(a, x.shape[2:], kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0)] + pads)
    spatial_axes = tuple(range(2, 2 + nd))
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=spatial_axes)
    # windows: [N, C_in, *positions, *span]; keep every stride-th position and dilation-th tap
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    out_spatial = windows.shape[2:2 + nd]
    positions = int(np.prod(out_spatial))
    taps = (c_in // groups) * int(np.prod(kernel))
    # im2col: [N, G, positions, C_in / G * K] @ [G, C_in / G * K, C_out / G] in one batched matmul
    cols = np.moveaxis(windows.reshape((n, groups, c_in // groups, positions, -1)), 3, 2).reshape(
        n, groups, positions, taps)
    out = np.matmul(cols, np.swapaxes(w.reshape(groups, c_out // groups, taps), 1, 2))
    out = np.swapaxes(out, 2, 3).reshape((n, c_out) + out_spatial)
    bias = a.get("bias")
    return out if bias is None else out + _f32(bias).reshape((1, -1) + (1,) * nd)


# --- normalization and reductions -------------------------------------------------------


def _layer_norm(a: Args) -> np.ndarray:
    x = _f32(a["x"])
    axes = axes_of(a.get("axes")) or tuple(range(x.ndim))
    axes = tuple(sorted(ax % x.ndim for ax in axes))
    mean = np.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=axes, keepdims=True)
    out = centered / np.sqrt(var + np.float32(a.get("epsilon", 1e-5)))
    param_shape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    return _scale_shift(out, a, param_shape)


def _scale_shift(out: np.ndarray, a: Args, shape: tuple[int, ...]) -> np.ndarray:
    """A norm's optional gamma / beta, reshaped to broadcast over `out`."""
    if a.get("gamma") is not None:
        out = out * _f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        out = out + _f32(a["beta"]).reshape(shape)
    return out


def _batch_norm(a: Args) -> np.ndarray:
    x = _f32(a["x"])
    shape = (1, -1) + (1,) * (x.ndim - 2)  # per channel, axis 1
    out = (x - _f32(a["mean"]).reshape(shape)) / np.sqrt(_f32(a["variance"]).reshape(shape)
                                                        + np.float32(a.get("epsilon", 1e-5)))
    return _scale_shift(out, a, shape)


def _instance_norm(a: Args) -> np.ndarray:
    x = _f32(a["x"])
    axes = tuple(range(2, x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.var(x, axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(a.get("epsilon", 1e-5)))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return _scale_shift(out, a, shape)


def _reduce(fn: Callable[[np.ndarray, tuple[int, ...] | None, bool], np.ndarray]) -> Handler:
    return lambda a: fn(_f32(a["x"]), axes_of(a.get("axes")), bool(a.get("keep_dims", False)))


def _reduce_arg(fn: Callable) -> Handler:
    def handler(a: Args) -> np.ndarray:
        out = fn(a["x"], axis=int(a.get("axis", -1)))
        return np.expand_dims(out, int(a.get("axis", -1))) if a.get("keep_dims", False) else out
    return handler


def _cumsum(a: Args) -> np.ndarray:
    x, axis = _f32(a["x"]), int(a.get("axis", 0))
    if a.get("reverse", False):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if a.get("exclusive", False):
        out = out - x
    return np.flip(out, axis) if a.get("reverse", False) else out


HANDLERS: dict[str, Handler] = {
    **LAYOUT_HANDLERS,
    # elementwise binary (broadcasting, in the inputs' dtype)
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.true_divide),
    "floor_div": _binary(np.floor_divide),
    "mod": _binary(np.mod),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "logical_and": _binary(np.logical_and),
    "logical_or": _binary(np.logical_or),
    "logical_xor": _binary(np.logical_xor),
    "logical_not": _unary(np.logical_not),
    # elementwise unary
    "abs": _unary(np.abs),
    "acos": _unary(np.arccos),
    "asin": _unary(np.arcsin),
    "atan": _unary(np.arctan),
    "atanh": _unary(np.arctanh),
    "ceil": _unary(np.ceil),
    "floor": _unary(np.floor),
    "round": _unary(np.round),  # half to even: MIL documents 0.5 -> 0
    "sign": _unary(np.sign),
    "cos": _unary(np.cos),
    "cosh": _unary(np.cosh),
    "sin": _unary(np.sin),
    "sinh": _unary(np.sinh),
    "tan": _unary(np.tan),
    "tanh": _unary(np.tanh),
    "exp": _unary(np.exp),
    "exp2": _unary(np.exp2),
    "sqrt": _unary(np.sqrt),
    "square": _unary(np.square),
    "erf": _unary_f32(lambda x: 1.0 - _erfc(x)),
    "rsqrt": lambda a: 1.0 / np.sqrt(_f32(a["x"]) + np.float32(a.get("epsilon", 1e-12))),
    "inverse": lambda a: 1.0 / (_f32(a["x"]) + np.float32(a.get("epsilon", 1e-4))),
    "log": lambda a: np.log(_f32(a["x"]) + np.float32(a.get("epsilon", 1e-45))),
    "clip": lambda a: np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"]),
    "threshold": lambda a: np.maximum(a["x"], a["alpha"]),
    # activations
    "relu": _unary(lambda x: np.maximum(x, np.zeros((), x.dtype))),
    "relu6": _unary(lambda x: np.clip(x, 0, 6).astype(x.dtype)),
    "sigmoid": _unary_f32(_sigmoid),
    "silu": _unary_f32(lambda x: x * _sigmoid(x)),
    "softplus": _unary_f32(lambda x: np.logaddexp(0.0, x)),
    "softsign": _unary_f32(lambda x: x / (1.0 + np.abs(x))),
    "gelu": _gelu,
    "leaky_relu": lambda a: np.where(a["x"] >= 0, a["x"], a["alpha"] * a["x"]),
    "elu": lambda a: np.where(a["x"] > 0, _f32(a["x"]), a["alpha"] * np.expm1(_f32(a["x"]))),
    "prelu": _prelu,
    "clamped_relu": _clamped_relu,
    "thresholded_relu": lambda a: np.where(a["x"] > a["alpha"], a["x"], np.zeros((), a["x"].dtype)),
    "linear_activation": lambda a: a["alpha"] * _f32(a["x"]) + a["beta"],
    "scaled_tanh": lambda a: a["alpha"] * np.tanh(a["beta"] * _f32(a["x"])),
    "sigmoid_hard": lambda a: np.clip(a["alpha"] * _f32(a["x"]) + a["beta"], 0.0, 1.0),
    "softplus_parametric": _softplus_parametric,
    "softmax": _softmax,
    # linear algebra (float32)
    "matmul": _matmul,
    "linear": _linear,
    "einsum": _einsum,
    "conv": _conv,
    "scaled_dot_product_attention": _scaled_dot_product_attention,
    # normalization and reductions (float32)
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "instance_norm": _instance_norm,
    "reduce_mean": _reduce(lambda x, ax, k: np.mean(x, axis=ax, keepdims=k)),
    "reduce_sum": _reduce(lambda x, ax, k: np.sum(x, axis=ax, keepdims=k)),
    "reduce_max": _reduce(lambda x, ax, k: np.max(x, axis=ax, keepdims=k)),
    "reduce_min": _reduce(lambda x, ax, k: np.min(x, axis=ax, keepdims=k)),
    "reduce_prod": _reduce(lambda x, ax, k: np.prod(x, axis=ax, keepdims=k)),
    "reduce_sum_square": _reduce(lambda x, ax, k: np.sum(x * x, axis=ax, keepdims=k)),
    "reduce_l1_norm": _reduce(lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k)),
    "reduce_l2_norm": _reduce(lambda x, ax, k: np.sqrt(np.sum(x * x, axis=ax, keepdims=k))),
    "reduce_log_sum": _reduce(lambda x, ax, k: np.log(np.sum(x, axis=ax, keepdims=k))),
    "reduce_log_sum_exp": _reduce(lambda x, ax, k: np.logaddexp.reduce(x, axis=ax, keepdims=k)),
    "reduce_argmax": _reduce_arg(np.argmax),
    "reduce_argmin": _reduce_arg(np.argmin),
    "cumsum": _cumsum,
}
