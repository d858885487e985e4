"""Weight-only quantize an exported graph (int4 or int8) one weight at a time: its fp32
data never sits in RAM.

onnxruntime's MatMulNBitsQuantizer works on a loaded ModelProto. At full E2B depth the raw
decoder graph is 9 GB of fp32 and quantizing it that way held ~1.8x the graph (RESULTS.md
section 3); the embedding tables would be another 11 GB of fp32 before quantization. Here:

    raw.onnx (+ raw.onnx.data) ──┬─ MatMul with a constant B: B read alone from the .data file,
                                 │  quantized by onnxruntime's DefaultWeightOnlyQuantizer (the
                                 │  per-node step MatMulNBitsQuantizer runs, 4 or 8 bits)
                                 │  ─► MatMulNBits
                                 ├─ Gather of a placeholder table: rows read in chunks from the
                                 │  caller (the bf16 checkpoint), onnxruntime's quantize_ndarray
                                 │  (4-bit) or its MatMulNBits packer (2- and 8-bit)
                                 │  ─► GatherBlockQuantized
                                 └─ everything else: bytes copied
                                      └─► out.onnx + out.onnx.data, appended as each is made

Row-chunking a table gives the same bytes as quantizing it whole: blocks run along a row
(quantize_axis 1) and every row fills whole bytes.

2- and 8-bit tables use GatherBlockQuantized's uint8 form, which reads MatMulNBits' layout
([rows, blocks, packed block], values offset by 2^(bits-1), the default zero point of both
operators): onnxruntime's MatMulNBits quantizer writes exactly that for the table's transpose
(its N = the table's rows). onnxruntime's own Gather quantizer writes 4 bits only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import ExportError
from edgekit.export.onnx.quantize import quiet_ort_logs

MS_DOMAIN = "com.microsoft"
# Big tensors start on 64 KiB boundaries so a runtime can memory-map them (the allocation
# granularity on Windows; a multiple of the page size everywhere else).
_ALIGN = 1 << 16
_ALIGN_FROM = 1 << 20
_TABLE_CHUNK_ELEMENTS = 1 << 24  # rows per chunk: ~64 MB of fp32 at a time


@dataclass(frozen=True)
class TableSource:
    """An embedding table the raw graph holds as a small placeholder initializer, and how to
    store it: `bits` (2, 4 or 8) per value, one scale per `block_size`, fp16 or fp32 scales."""

    rows: int
    cols: int
    read: Callable[[int, int], np.ndarray]  # (start, stop) -> fp32 rows [stop - start, cols]
    bits: int = 4
    block_size: int = 32
    fp16_scales: bool = True


def quantize_graph_weights(raw: Path, out: Path, *, block_size: int, bits: int = 4, matmuls: bool = True,
                           tables: dict[str, TableSource] | None = None,
                           lm_head: tuple[int, int] | None = None) -> dict[str, int]:
    """Write `out` (+ `out.data`) from `raw`: MatMul weights (if `matmuls`) in `bits` (4 or 8),
    symmetric, `block_size` per block, and the `tables` (placeholder initializer name -> source)
    as each source says. `lm_head` = (vocab size, block size): the MatMul with that many output
    columns takes that block size instead. Returns counts: {"matmuls": n, "tables": n}."""
    if matmuls and bits not in (4, 8):
        raise ExportError(f"MatMul weights take 4 or 8 bits here, not {bits}")
    tables = dict(tables or {})
    model = onnx.load(str(raw), load_external_data=False)
    graph = model.graph
    reader = _Reader(raw.parent)
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    quantizer = _ort_quantizer(block_size, bits)
    head_quantizer = _ort_quantizer(lm_head[1], bits) if lm_head else quantizer
    out_data = out.with_name(out.name + ".data")
    counts = {"matmuls": 0, "tables": 0}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    with _DataFile(out_data) as data, quiet_ort_logs():
        for node in graph.node:
            if node.op_type == "Gather" and node.input[0] in tables:
                source = tables.pop(node.input[0])
                new_nodes.extend(_gather_block_quantized(node, source, data, new_inits))
                counts["tables"] += 1
                continue
            weight = _constant_b(node, inits, producers, reader) if matmuls and node.op_type == "MatMul" else None
            if weight is None:
                new_nodes.append(node)
                continue
            chosen = head_quantizer if lm_head and weight.shape[-1] == lm_head[0] else quantizer
            scratch = helper.make_graph([], "weight", [], [], initializer=[numpy_helper.from_array(weight, node.input[1])])
            del weight
            try:
                replaced = chosen.quantize(node, [scratch])
            except Exception as exc:  # onnxruntime's own message, one line
                raise ExportError(f"int{bits} quantization of {node.name or node.output[0]} failed: {exc}") from exc
            for made in scratch.initializer[1:]:
                payload = made.raw_data if made.HasField("raw_data") else numpy_helper.to_array(made).tobytes()
                made.ClearField("raw_data")
                # A copy, not `made`: a kept sub-message keeps its whole parent graph alive
                # (the fp32 weight too) for as long as it lives.
                tensor = TensorProto()
                tensor.CopyFrom(made)
                data.put(tensor, payload)
                new_inits.append(tensor)
            del scratch
            new_nodes.extend(replaced)
            counts["matmuls"] += 1
        if tables:
            raise ExportError(f"{raw.name}: no Gather reads {', '.join(sorted(tables))}")
        used = {name for n in new_nodes for name in n.input} | {o.name for o in graph.output}
        kept_nodes = [n for n in new_nodes if not (n.op_type == "Transpose" and not (set(n.output) & used))]
        used = {name for n in kept_nodes for name in n.input} | {o.name for o in graph.output}
        kept_inits = []
        for tensor in graph.initializer:
            if tensor.name not in used:
                continue
            if tensor.data_location == TensorProto.EXTERNAL:
                data.put(tensor, reader.raw_bytes(tensor))
            kept_inits.append(tensor)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept_inits, *new_inits])
    if counts["matmuls"] or counts["tables"]:
        _import_ms_domain(model)
    onnx.save(model, str(out))
    return counts


# --- onnxruntime's quantizer ----------------------------------------------------------------

def _ort_quantizer(block_size: int, bits: int = 4):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    # accuracy_level=4 (int8 compute): without it int4 decodes 2x slower on CPU (docs/export-notes.md),
    # and int8 far worse: a one-token 1536 x 8192 MatMulNBits bits=8 took 47-58 ms against
    # 0.3-0.6 ms with it (x86, 2 threads, block 32-128).
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    return DefaultWeightOnlyQuantizer(config)


def _constant_b(node, inits, producers, reader: "_Reader") -> np.ndarray | None:
    """MatMul's B as fp32 when it is an initializer or a Transpose of one (the tied lm_head:
    the exporter keeps F.linear(x, W) with a shared W as MatMul(x, Transpose(W)))."""
    name = node.input[1]
    if name in inits:
        array = reader.array(inits[name])
    elif (src := producers.get(name)) is not None and src.op_type == "Transpose" and src.input[0] in inits:
        perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), None)
        array = np.ascontiguousarray(reader.array(inits[src.input[0]]).transpose(perm))
    else:
        return None
    if array.dtype != np.float32 or array.ndim < 2 or any(d != 1 for d in array.shape[:-2]):
        return None  # what onnxruntime's quantizer would skip too
    return array


def _gather_block_quantized(node, source: TableSource, data: "_DataFile",
                            new_inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """The GatherBlockQuantized node onnxruntime's quantize_gather makes, with the table
    quantized in row chunks straight into the data file. With fp16 scales the node yields
    fp16 rows, cast back to fp32."""
    bits, block = source.bits, source.block_size
    if bits not in (2, 4, 8):
        raise ExportError(f"{node.input[0]}: ONNX tables take 2-, 4- or 8-bit schemes, not {bits}-bit")
    if bits == 4 and source.cols % 2:
        raise ExportError(f"{node.input[0]}: int4 rows need an even width, got {source.cols}")
    if bits == 2 and source.cols % block:  # MatMulNBits' packing pads a partial block
        raise ExportError(f"{node.input[0]}: 2-bit rows need whole blocks: width {source.cols}, block {block}")
    name = node.input[0]
    if bits == 4:
        q_tensor = TensorProto(name=name + "_Q4", data_type=TensorProto.INT4, dims=[source.rows, source.cols])
        quantize = _int4_rows
    else:
        q_tensor = TensorProto(name=name + f"_Q{bits}", data_type=TensorProto.UINT8,
                               dims=[source.rows, source.cols * bits // 8])
        quantize = functools.partial(_packed_rows, bits=bits)
    scale_chunks: list[np.ndarray] = []

    def packed_chunks() -> Iterator[bytes]:
        step = max(1, _TABLE_CHUNK_ELEMENTS // source.cols)
        for start in range(0, source.rows, step):
            rows = np.ascontiguousarray(source.read(start, min(start + step, source.rows)), dtype=np.float32)
            packed, scales = quantize(rows, block)
            scale_chunks.append(scales.astype(np.float16) if source.fp16_scales else scales)
            yield packed.tobytes()

    data.put_stream(q_tensor, packed_chunks())
    scales = numpy_helper.from_array(np.concatenate(scale_chunks), name + "_scales")
    scale_chunks.clear()
    data.put(scales, scales.raw_data)
    new_inits.extend([q_tensor, scales])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    rows_out = node.output[0] + "_fp16" if source.fp16_scales else node.output[0]
    gather = helper.make_node("GatherBlockQuantized", [q_tensor.name, node.input[1], scales.name], [rows_out],
                              name=(node.name + q_tensor.name[-3:]) if node.name else "", domain=MS_DOMAIN,
                              gather_axis=axis, quantize_axis=1, block_size=block, bits=bits)
    if not source.fp16_scales:
        return [gather]
    return [gather, helper.make_node("Cast", [rows_out], [node.output[0]], to=TensorProto.FLOAT)]


def _int4_rows(rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's quantize_gather step: signed int4 values, two per byte; scales [rows, blocks]."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    packed, scales, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(rows, 1, block, True)
    return packed, scales


def _packed_rows(rows: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's MatMulNBits quantizer at `bits` (2 or 8) on the rows' transpose: [rows,
    blocks, block * bits / 8] bytes (values + 2^(bits-1)), scales [rows, blocks]. At 8 bits a
    partial last block is padded there and cut here: GatherBlockQuantized reads [rows, cols] bytes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits))
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(rows.T))
    if bits == 8:
        packed = np.ascontiguousarray(packed.reshape(rows.shape[0], -1)[:, :rows.shape[1]])
    return packed, scales


def _import_ms_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# --- external data --------------------------------------------------------------------------

class _Reader:
    """Reads one initializer's bytes from the raw graph's external data (one at a time)."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def _location(self, tensor: TensorProto) -> tuple[Path, int, int]:
        info = {e.key: e.value for e in tensor.external_data}
        return self.base / info["location"], int(info.get("offset", 0)), int(info["length"])

    def raw_bytes(self, tensor: TensorProto) -> bytes:
        path, offset, length = self._location(tensor)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def array(self, tensor: TensorProto) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        path, offset, length = self._location(tensor)
        with open(path, "rb") as f:  # read straight into the array: one copy, no bytes object
            f.seek(offset)
            return np.fromfile(f, dtype=dtype, count=length // dtype.itemsize).reshape(tuple(tensor.dims))


class _DataFile:
    """The output graph's single .data file, written front to back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def __enter__(self) -> "_DataFile":
        self.file = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def put(self, tensor: TensorProto, payload: bytes | memoryview) -> None:
        self.put_stream(tensor, (payload,), size_hint=len(payload))

    def put_stream(self, tensor: TensorProto, chunks: Iterable[bytes], *, size_hint: int | None = None) -> None:
        if size_hint is None or size_hint >= _ALIGN_FROM:
            pad = -self.offset % _ALIGN
            self.file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            self.file.write(chunk)
            self.offset += len(chunk)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(self.offset - start))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
