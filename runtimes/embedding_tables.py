"""Embedding tables stored as plain row files an app memory-maps and reads rows from (Core ML bundles).

E2B's per-layer table is 2.35 B values: inside a Core ML program it would be one constant
that the runtime may expand to float16 when it loads (4.7 GB, more than an iPhone gives an
app), and a lookup reads 1 row of 262 144. As a file, a token costs one contiguous read of
one row (about 5 KB at int4 for E2B) and the rest stays on disk.

Layout, one definition for the writer (export/coreml/embedding_tables.py), this reader and
the Swift listing in docs/apple.md. A table is `rows` rows of `row_bytes` bytes, row i at
byte i * row_bytes, no header; each row is its `columns` values, then its scales:

    float32   columns x float32 (little-endian); no scales (the fp32 recipe)
    float16   columns x float16 (little-endian); no scales
    int8      columns x int8; then columns / group_size x float16 scales
    int4      columns / 2 bytes, two values per byte, even column in the low nibble, each
              stored as value + 8 (0..15 for -8..7); then columns / group_size x float16 scales
    int2      columns / 4 bytes, four values per byte, column 4k + j in bits 2j..2j+1, each
              stored as value + 2 (0..3 for -2..1); then the scales as above

    value[c] = q[c] * scale[c // group_size]

Values are final: the embedding scale (sqrt(hidden) for tokens, sqrt(per-layer width) for
the per-layer rows) is already applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BundleError, InputError

DTYPES = ("float32", "float16", "int8", "int4", "int2")
FLOAT_BYTES = {"float32": 4, "float16": 2}
VALUES_PER_BYTE = {"int8": 1, "int4": 2, "int2": 4}
SCALE_BYTES = 2  # float16


@dataclass(frozen=True)
class TableLayout:
    rows: int
    columns: int
    dtype: str  # one of DTYPES
    group_size: int  # columns per scale (columns itself: one scale per row); unused for float16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BundleError(f"embedding table dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.rows < 1 or self.columns < 1 or self.group_size < 1 or self.columns % self.group_size:
            raise BundleError(f"embedding table layout {self} is inconsistent: columns must be a multiple of "
                              "group_size")
        if self.dtype in VALUES_PER_BYTE and self.columns % VALUES_PER_BYTE[self.dtype]:
            raise BundleError(f"an {self.dtype} embedding table needs a multiple of {VALUES_PER_BYTE[self.dtype]} "
                              "columns")

    @property
    def value_bytes(self) -> int:
        if self.dtype in FLOAT_BYTES:
            return FLOAT_BYTES[self.dtype] * self.columns
        return self.columns // VALUES_PER_BYTE[self.dtype]

    @property
    def scale_count(self) -> int:
        return 0 if self.dtype in FLOAT_BYTES else self.columns // self.group_size

    @property
    def row_bytes(self) -> int:
        return self.value_bytes + SCALE_BYTES * self.scale_count

    @property
    def file_bytes(self) -> int:
        return self.rows * self.row_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "columns": self.columns, "dtype": self.dtype, "group_size": self.group_size,
                "row_bytes": self.row_bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TableLayout":
        try:
            layout = cls(int(data["rows"]), int(data["columns"]), str(data["dtype"]), int(data["group_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"embedding table entry {data!r} is malformed ({exc})") from None
        if int(data.get("row_bytes", layout.row_bytes)) != layout.row_bytes:
            raise BundleError(f"embedding table says {data['row_bytes']} bytes per row; its layout makes "
                              f"{layout.row_bytes}")
        return layout


def decode_rows(raw: np.ndarray, layout: TableLayout) -> np.ndarray:
    """Rows of bytes [n, row_bytes] -> values [n, columns] float32."""
    n = raw.shape[0]
    values = raw[:, : layout.value_bytes]
    if layout.dtype in FLOAT_BYTES:
        return values.copy().view("<f4" if layout.dtype == "float32" else "<f2").astype(np.float32)
    scales = raw[:, layout.value_bytes:].copy().view("<f2").astype(np.float32)  # [n, groups]
    if layout.dtype == "int8":
        q = values.view(np.int8).astype(np.float32)
    else:
        per_byte = VALUES_PER_BYTE[layout.dtype]
        bits = 8 // per_byte
        offset, mask = 1 << (bits - 1), (1 << bits) - 1
        q = np.empty((n, layout.columns), np.float32)
        for j in range(per_byte):
            q[:, j::per_byte] = ((values >> (bits * j)) & mask).astype(np.float32) - offset
    return (q.reshape(n, layout.scale_count, layout.group_size) * scales[..., None]).reshape(n, layout.columns)


class EmbeddingTable:
    """A memory-mapped table: `lookup(ids)` reads only the rows asked for."""

    def __init__(self, path: Path, layout: TableLayout) -> None:
        size = path.stat().st_size
        if size != layout.file_bytes:
            raise BundleError(f"{path.name} is {size} bytes; its layout ({layout.rows} rows of {layout.row_bytes} "
                              f"bytes) makes {layout.file_bytes}")
        self.layout = layout
        self._rows = np.memmap(path, dtype=np.uint8, mode="r", shape=(layout.rows, layout.row_bytes))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.layout.rows):
            bad = int(ids[(ids < 0) | (ids >= self.layout.rows)][0])
            raise InputError(f"token id {bad} is outside the vocabulary (0..{self.layout.rows - 1})")
        return decode_rows(np.asarray(self._rows[ids]), self.layout)
