"""Compressed Core ML weights (MIL constexpr_* ops) decompressed to dense numpy, once per program.

coremltools' MIL loader hands sub-byte data unpacked, one element per int8 / uint8 (an int4
weight of shape [out, in] arrives as an int8 array of that shape, values -8..7), so no bit
unpacking is needed for the iOS 18 ops. Block sizes are implied by shapes: a dim of size n
whose scale (or lut) has size s is cut into s blocks of n // s.

    constexpr_blockwise_shift_scale (iOS 18)  out = scale * (data - offset), per block
    constexpr_lut_to_dense (iOS 18)           out = lut[block, indices] (vectors along vector_axis)
    constexpr_affine_dequantize (iOS 16)      out = scale * (data - zero_point), per channel on axis
    any other constexpr_*                     coremltools' own materialized_val_inference

Big tables (a 262144 x 1536 embedding) are decompressed in row chunks, so the temporaries
stay small next to the dense result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # elements per decompression chunk (~16 MB of float32)


def _row_chunks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of dim 0, ~_CHUNK_ELEMENTS elements each."""
    per_chunk = max(1, _CHUNK_ELEMENTS // max(row_elements, 1))
    for start in range(0, rows, per_chunk):
        yield start, min(rows, start + per_chunk)


def _blocked(x: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
    """[n0, n1, ...] -> [n0 / b0, b0, n1 / b1, b1, ...]: each block its own pair of dims."""
    shape = []
    for n, b in zip(x.shape, blocks):
        shape += [n // b, b]
    return x.reshape(shape)


def _per_block(x: np.ndarray) -> np.ndarray:
    """[s0, s1, ...] -> [s0, 1, s1, 1, ...], broadcasting against _blocked data."""
    return x.reshape([d for s in x.shape for d in (s, 1)])


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None,
                          dtype: np.dtype) -> np.ndarray:
    """scale * (data - offset), scale and offset repeated over blocks of data.

    Computed in float32 and rounded once to `dtype`: with integer data and offsets every
    product is exact in float32, so this equals coremltools' float16 arithmetic."""
    blocks = tuple(n // s for n, s in zip(data.shape, scale.shape))
    out = np.empty(data.shape, dtype)
    row_elements = int(np.prod(data.shape[1:], dtype=np.int64))
    for start, stop in _row_chunks(data.shape[0], row_elements):
        block_of_row = np.arange(start, stop) // blocks[0]  # dim 0 by row, the others by _blocked
        values = _blocked(data[start:stop].astype(np.float32), (1,) + blocks[1:])
        if offset is not None:
            values -= _per_block(offset[block_of_row].astype(np.float32))
        values *= _per_block(scale[block_of_row].astype(np.float32))
        out[start:stop] = values.reshape((stop - start,) + data.shape[1:])
    return out


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """lut: [*palette blocks (one per dim of indices), 2**nbits, vector size]. Each index picks
    a value (or a vector, laid along vector_axis) from the palette of its block."""
    palettes, vector = lut.shape[-2], lut.shape[-1]
    rank = indices.ndim
    blocks = tuple(n // s for n, s in zip(indices.shape, lut.shape[:rank]))
    flat_lut = lut.reshape(-1, palettes, vector)
    # the linear palette number of every index position, as broadcastable aranges per dim
    palette_strides = np.cumprod((lut.shape[1:rank] + (1,))[::-1])[::-1]
    out_shape = list(indices.shape)
    axis = None if vector == 1 else int(vector_axis) % rank
    if axis is not None:
        out_shape[axis] *= vector
    out = np.empty(out_shape, lut.dtype)
    row_elements = int(np.prod(indices.shape[1:], dtype=np.int64))
    rows_out = vector if axis == 0 else 1
    for start, stop in _row_chunks(indices.shape[0], row_elements * vector):
        chunk = indices[start:stop].astype(np.intp)
        palette = np.zeros((1,) * rank, np.intp)
        for dim in range(rank):
            positions = np.arange(chunk.shape[dim]) + (start if dim == 0 else 0)
            palette = palette + (positions // blocks[dim] * palette_strides[dim]).reshape(
                (1,) * dim + (-1,) + (1,) * (rank - dim - 1))
        picked = flat_lut[palette, chunk]  # [*chunk.shape, vector]
        if axis is None:
            picked = picked[..., 0]
        else:  # vector j of the index at position i along axis lands at i * vector + j
            picked = np.moveaxis(picked, -1, axis + 1)
            merged = list(chunk.shape)
            merged[axis] *= vector
            picked = picked.reshape(merged)
        out[start * rows_out:stop * rows_out] = picked
    return out


def affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int,
                      dtype: np.dtype) -> np.ndarray:
    """scale * (data - zero_point); zero_point and scale are scalars or vectors along axis."""
    shape = [1] * quantized_data.ndim
    axis %= quantized_data.ndim

    def along_axis(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim == 0:
            return v
        shape[axis] = -1
        return v.reshape(shape)

    out = (quantized_data.astype(np.float32) - along_axis(zero_point)) * along_axis(scale)
    return out.astype(dtype)


def decompress(op: Any, args: dict[str, Any], dtypes: tuple[np.dtype, ...]) -> tuple[np.ndarray, ...]:
    """The dense value(s) of a constexpr_* op; `args` are its inputs already as numpy."""
    handler = _DECOMPRESSORS.get(op.op_type)
    if handler is not None and handler[0](args):
        return (handler[1](args, dtypes[0]),)
    value = op.materialized_val_inference()  # the rarer ones: sparse, constexpr_cast, iOS 16 lut
    values = value if isinstance(value, tuple) else (value,)
    return tuple(np.asarray(v).astype(d, copy=False) for v, d in zip(values, dtypes))


# op type -> (applies to these inputs, decompressor)
_DECOMPRESSORS: dict[str, tuple[Callable[[dict], bool], Callable[[dict, np.dtype], np.ndarray]]] = {
    "constexpr_blockwise_shift_scale": (
        lambda a: True,
        lambda a, dtype: blockwise_shift_scale(a["data"], a["scale"], a.get("offset"), dtype),
    ),
    # the iOS 16 op of the same name takes packed indices, a flat lut and a `shape`
    "constexpr_lut_to_dense": (
        lambda a: "shape" not in a,
        lambda a, dtype: lut_to_dense(a["indices"], a["lut"], a.get("vector_axis")).astype(dtype, copy=False),
    ),
    "constexpr_affine_dequantize": (
        lambda a: True,
        lambda a, dtype: affine_dequantize(a["quantized_data"], a["zero_point"], a["scale"], int(a["axis"]), dtype),
    ),
}
