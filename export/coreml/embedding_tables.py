"""Write the token and per-layer embedding tables as row files (layout: edgekit.runtimes.embedding_tables).

Rows come from the model's own embedding modules (scale applied), a block at a time, so an
E2B table (2.35 B values) never exists in float32 at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekit.recipes import QuantScheme
from edgekit.runtimes.embedding_tables import TableLayout

ROWS_PER_BLOCK = 4096


def layout_for(scheme: QuantScheme, *, rows: int, columns: int) -> TableLayout:
    """The stored form of a `scheme` table. A group that does not divide the row becomes one
    scale per row (tiny test widths); 2-bit schemes are not a Core ML recipe."""
    if not scheme.quantized:
        return TableLayout(rows, columns, "float16", columns)
    if scheme.weight_bits not in (4, 8):
        raise ValueError(f"no {scheme.weight_bits}-bit embedding table layout")
    group = scheme.group_size or columns
    if columns % group:
        group = columns
    return TableLayout(rows, columns, f"int{scheme.weight_bits}", group)


def encode_rows(values: np.ndarray, layout: TableLayout) -> np.ndarray:
    """Values [n, columns] float32 -> rows of bytes [n, row_bytes] (symmetric, round to nearest)."""
    n = values.shape[0]
    if layout.dtype == "float16":
        return values.astype("<f2").view(np.uint8).reshape(n, layout.row_bytes)
    levels = 127 if layout.dtype == "int8" else 7
    grouped = values.reshape(n, layout.scale_count, layout.group_size)
    scales = (np.abs(grouped).max(axis=-1) / levels).astype("<f2")
    safe = np.where(scales == 0, 1, scales).astype(np.float32)[..., None]
    q = np.clip(np.rint(grouped / safe), -levels - (layout.dtype == "int4"), levels).reshape(n, layout.columns)
    if layout.dtype == "int8":
        packed = q.astype(np.int8).view(np.uint8)
    else:
        nibbles = (q + 8).astype(np.uint8)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return np.concatenate([packed, scales.view(np.uint8).reshape(n, -1)], axis=1)


def write_table(lookup: Callable[[torch.Tensor], torch.Tensor], layout: TableLayout, path: Path,
                on_block: Callable[[], None] | None = None) -> None:
    """Write rows 0..rows-1, `lookup(ids [n]) -> [n, columns]` giving each block's values."""
    with open(path, "wb") as fh:
        for start in range(0, layout.rows, ROWS_PER_BLOCK):
            ids = torch.arange(start, min(start + ROWS_PER_BLOCK, layout.rows))
            with torch.no_grad():
                values = lookup(ids).float().reshape(len(ids), layout.columns).numpy()
            fh.write(encode_rows(values, layout).tobytes())
            if on_block:
                on_block()
