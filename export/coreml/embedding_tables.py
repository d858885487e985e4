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
from edgekit.runtimes.embedding_tables import VALUES_PER_BYTE, TableLayout

ROWS_PER_BLOCK = 4096


def layout_for(scheme: QuantScheme, *, rows: int, columns: int) -> TableLayout:
    """The stored form of a `scheme` table. A group that does not divide the row becomes one
    scale per row (tiny test widths)."""
    if not scheme.quantized:
        return TableLayout(rows, columns, "float32" if scheme.weight_bits == 32 else "float16", columns)
    if scheme.weight_bits not in (2, 4, 8):
        raise ValueError(f"no {scheme.weight_bits}-bit embedding table layout")
    group = scheme.group_size or columns
    if columns % group:
        group = columns
    return TableLayout(rows, columns, f"int{scheme.weight_bits}", group)


def encode_rows(values: np.ndarray, layout: TableLayout) -> np.ndarray:
    """Values [n, columns] float32 -> rows of bytes [n, row_bytes] (symmetric, round to nearest).

    int8 / int4 use -127..127 / -7..7 (scale = largest magnitude / 127 or 7); int2's four
    levels -2..1 are not symmetric, so its scale covers both ends: max(-min / 2, max)."""
    n = values.shape[0]
    if layout.dtype in ("float32", "float16"):
        return values.astype("<f4" if layout.dtype == "float32" else "<f2").view(np.uint8).reshape(n, layout.row_bytes)
    grouped = values.reshape(n, layout.scale_count, layout.group_size)
    if layout.dtype == "int2":
        low, high = -2, 1
        scales = np.maximum(-grouped.min(axis=-1) / 2, grouped.max(axis=-1)).astype("<f2")
    else:
        high = 127 if layout.dtype == "int8" else 7
        low = -high
        scales = (np.abs(grouped).max(axis=-1) / high).astype("<f2")
    safe = np.where(scales == 0, 1, scales).astype(np.float32)[..., None]
    q = np.clip(np.rint(grouped / safe), low, high).reshape(n, layout.columns)
    if layout.dtype == "int8":
        packed = q.astype(np.int8).view(np.uint8)
    else:
        per_byte = VALUES_PER_BYTE[layout.dtype]
        bits = 8 // per_byte
        stored = (q + (1 << (bits - 1))).astype(np.uint8)
        packed = np.zeros((n, layout.columns // per_byte), np.uint8)
        for j in range(per_byte):
            packed |= stored[:, j::per_byte] << (bits * j)
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
