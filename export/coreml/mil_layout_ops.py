"""numpy handlers for MIL's data-movement ops: slicing, reshaping, concatenation, gather /
scatter, states and tensor creation (LAYOUT_HANDLERS; mil_numpy_ops.HANDLERS includes it).

They move values without arithmetic, so they run in the inputs' dtype. A handler takes the
op's inputs by parameter name and returns its output(s); the caller casts to the output
Var's dtype (mil_numpy_ops.py says more).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Args = dict[str, Any]
Handler = Callable[[Args], Any]


def axes_of(value: Any) -> tuple[int, ...] | None:
    """An axes / perm / reps input as a tuple of ints (None stays None: all axes)."""
    return None if value is None else tuple(int(a) for a in np.atleast_1d(value))


# --- slicing, shapes, layout ------------------------------------------------------------


def _index_slices(a: Args, rank: int) -> tuple:
    """numpy index for slice_by_index / slice_update: squeezed dims become plain integers."""
    begin = [int(b) for b in np.asarray(a["begin"]).ravel()]
    end = [int(e) for e in np.asarray(a["end"]).ravel()]
    stride = a.get("stride")
    stride = [1] * rank if stride is None else [int(s) for s in np.asarray(stride).ravel()]
    begin_mask = a.get("begin_mask")
    end_mask = a.get("end_mask")
    squeeze_mask = a.get("squeeze_mask")
    index: list = []
    for i in range(rank):
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(begin[i])
            continue
        start = None if begin_mask is not None and begin_mask[i] else begin[i]
        stop = None if end_mask is not None and end_mask[i] else end[i]
        index.append(slice(start, stop, stride[i]))
    return tuple(index)


def _slice_by_index(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    return x[_index_slices(a, x.ndim)]


def _slice_by_size(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    begin = [int(b) for b in np.asarray(a["begin"]).ravel()]
    size = [int(s) for s in np.asarray(a["size"]).ravel()]
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def _slice_update(a: Args) -> np.ndarray:
    out = np.array(a["x"])
    index = _index_slices(a, out.ndim)
    out[index] = np.reshape(a["update"], out[index].shape)
    return out


def _reshape(a: Args) -> np.ndarray:
    """0 in `shape` copies the matching dim of x counted from the right, 1 past x's rank
    (the iOS 17 rule, which equals iOS 15's where both apply)."""
    x = np.asarray(a["x"])
    shape = [int(s) for s in np.asarray(a["shape"]).ravel()]
    for i, s in enumerate(shape):
        if s == 0:
            j = x.ndim - (len(shape) - i)
            shape[i] = x.shape[j] if j >= 0 else 1
    return x.reshape(shape)


def _squeeze(a: Args) -> np.ndarray:
    axes = axes_of(a.get("axes"))
    return np.squeeze(a["x"], axis=axes)


def _concat(a: Args) -> np.ndarray:
    values = [np.asarray(v) for v in a["values"]]
    axis = int(a["axis"])
    if not a.get("interleave", False):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim  # [a0, b0, a1, b1, ...] along axis
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


def _split(a: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(a["x"])
    axis = int(a["axis"])
    sizes = a.get("split_sizes")
    if sizes is None:
        return tuple(np.split(x, int(a["num_splits"]), axis=axis))
    return tuple(np.split(x, np.cumsum([int(s) for s in np.asarray(sizes).ravel()])[:-1], axis=axis))


def _pad(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    pad = [int(p) for p in np.asarray(a["pad"]).ravel()]
    pad = [0] * (2 * x.ndim - len(pad)) + pad  # pad covers the last len(pad) / 2 dims
    widths = [(pad[2 * i], pad[2 * i + 1]) for i in range(x.ndim)]
    mode = str(a.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, constant_values=a.get("constant_val", 0))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise ValueError(f"unknown pad mode {mode!r}")


def _sliding_windows(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    axis = int(a["axis"]) % x.ndim
    size, stride = int(a["size"]), int(a.get("stride", 1))
    windows = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # window dim last
    windows = windows[(slice(None),) * axis + (slice(None, None, stride),)]
    return np.moveaxis(windows, -1, axis + 1)


def _band_part(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    lower, upper = int(a.get("lower", -1)), int(a.get("upper", -1))
    rows = np.arange(x.shape[-2])[:, None]
    cols = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


def _topk(a: Args) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a["x"])
    axis, k = int(a.get("axis", -1)), int(a["k"])
    order = np.argsort(x if a.get("ascending", False) else -x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    return (values, indices) if a.get("return_indices", True) else values


def _argsort(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    return np.argsort(x if a.get("ascending", False) else -x, axis=int(a.get("axis", -1)), kind="stable")


# --- gather and scatter -----------------------------------------------------------------


def _gather(a: Args) -> np.ndarray:
    x, indices = np.asarray(a["x"]), np.asarray(a["indices"])
    axis = int(a.get("axis", 0)) % x.ndim
    batch_dims = int(a.get("batch_dims", 0))
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    batch = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    ids = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([np.take(xs[b], ids[b], axis=axis - batch_dims) for b in range(xs.shape[0])])
    return out.reshape(batch + out.shape[1:])


def _gather_nd(a: Args) -> np.ndarray:
    x, indices = np.asarray(a["x"]), np.asarray(a["indices"])
    batch_dims = int(a.get("batch_dims", 0))
    if batch_dims == 0:
        return x[tuple(np.moveaxis(indices, -1, 0))]
    batch = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    ids = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([xs[b][tuple(np.moveaxis(ids[b], -1, 0))] for b in range(xs.shape[0])])
    return out.reshape(batch + out.shape[1:])


def _gather_along_axis(a: Args) -> np.ndarray:
    return np.take_along_axis(np.asarray(a["x"]), np.asarray(a["indices"]), axis=int(a.get("axis", 0)))


# scatter modes: "update" assigns (the last duplicate index wins); the rest accumulate
_SCATTER_UFUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                   "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, index: tuple, updates: np.ndarray, mode: str) -> np.ndarray:
    if mode == "update":
        out[index] = updates
    elif mode in _SCATTER_UFUNCS:
        _SCATTER_UFUNCS[mode].at(out, index, updates)
    else:
        raise ValueError(f"unknown scatter mode {mode!r}")
    return out


def _scatter(a: Args) -> np.ndarray:
    """out[..., indices[i], ...] (mode) updates[..., i, ...] along `axis`; indices are
    non-negative from iOS 17 on, and may have any shape (updates then carry it at `axis`)."""
    data = np.asarray(a["data"])
    indices = np.asarray(a["indices"]).ravel()
    axis = int(a.get("axis", 0)) % data.ndim
    out = np.array(data)
    prefix = int(np.prod(data.shape[:axis], dtype=np.int64))
    out3 = out.reshape(prefix, data.shape[axis], -1)
    updates = np.asarray(a["updates"]).reshape(prefix, indices.size, -1)
    _scatter_into(out3, (slice(None), indices), updates, str(a.get("mode", "update")))
    return out


def _scatter_along_axis(a: Args) -> np.ndarray:
    data, indices = np.asarray(a["data"]), np.asarray(a["indices"])
    axis = int(a.get("axis", 0)) % data.ndim
    grid = list(np.ogrid[tuple(slice(0, n) for n in indices.shape)])
    grid[axis] = indices
    return _scatter_into(np.array(data), tuple(grid), np.asarray(a["updates"]), str(a.get("mode", "update")))


def _scatter_nd(a: Args) -> np.ndarray:
    indices = np.asarray(a["indices"])
    return _scatter_into(np.array(a["data"]), tuple(np.moveaxis(indices, -1, 0)), np.asarray(a["updates"]),
                         str(a.get("mode", "update")))


# --- states -----------------------------------------------------------------------------


def _read_state(a: Args) -> np.ndarray:
    return np.array(a["input"])  # a snapshot: a later coreml_update_state writes the array in place


def _coreml_update_state(a: Args) -> np.ndarray:
    np.copyto(a["state"], a["value"], casting="same_kind")
    return a["value"]


# --- creation ---------------------------------------------------------------------------


def _range_1d(a: Args) -> np.ndarray:
    return np.arange(a["start"], a["end"], a["step"])


def _fill(a: Args) -> np.ndarray:
    return np.full([int(s) for s in np.asarray(a["shape"]).ravel()], a.get("value", 0.0))


def _flatten2d(a: Args) -> np.ndarray:
    x = np.asarray(a["x"])
    axis = int(a.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


LAYOUT_HANDLERS: dict[str, Handler] = {
    "identity": lambda a: a["x"],
    "cast": lambda a: a["x"],  # the caller casts to the output Var's dtype (float -> int truncates)
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "topk": _topk,
    "argsort": _argsort,
    # shapes and layout
    "reshape": _reshape,
    "expand_dims": lambda a: np.expand_dims(a["x"], axes_of(a["axes"])),
    "squeeze": _squeeze,
    "transpose": lambda a: np.transpose(a["x"], axes_of(a["perm"])),
    "reverse": lambda a: np.flip(a["x"], axes_of(a.get("axes"))),
    "flatten2d": _flatten2d,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "sliding_windows": _sliding_windows,
    "concat": _concat,
    "split": _split,
    "stack": lambda a: np.stack(a["values"], axis=int(a["axis"])),
    "tile": lambda a: np.tile(a["x"], axes_of(a["reps"])),
    "pad": _pad,
    "band_part": _band_part,
    "shape": lambda a: np.asarray(np.shape(a["x"]), dtype=np.int32),
    "fill": _fill,
    "fill_like": lambda a: np.full(np.shape(a["ref_tensor"]), a.get("value", 0.0)),
    "range_1d": _range_1d,
    # gather / scatter
    "gather": _gather,
    "gather_nd": _gather_nd,
    "gather_along_axis": _gather_along_axis,
    "scatter": _scatter,
    "scatter_nd": _scatter_nd,
    "scatter_along_axis": _scatter_along_axis,
    # states
    "read_state": _read_state,
    "coreml_update_state": _coreml_update_state,
}
