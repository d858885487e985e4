"""The one-weight-at-a-time quantizer writes what onnxruntime's whole-model quantizer writes:
same MatMulNBits / GatherBlockQuantized weights, same outputs, for tables read in row chunks
and for a tied lm_head reached through a Transpose; 2- and 8-bit tables, which onnxruntime's
Gather quantizer does not write, hold the nearest levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import ExportError
from edgekit.export.onnx import stream_quantize
from edgekit.export.onnx.stream_quantize import TableSource, quantize_graph_weights

VOCAB, HIDDEN, FF = 300, 64, 96


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"table": rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32),
            "up": rng.standard_normal((HIDDEN, FF), dtype=np.float32) * 0.1,
            "down": rng.standard_normal((FF, HIDDEN), dtype=np.float32) * 0.1}


def _graph(table: np.ndarray, w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(up) -> MatMul(down) -> MatMul(Transpose(table)) (tied head)."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
             helper.make_node("MatMul", ["emb", "up"], ["h1"], name="up_proj"),
             helper.make_node("MatMul", ["h1", "down"], ["h2"], name="down_proj"),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tied"),
             helper.make_node("MatMul", ["h2", "table_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", HIDDEN])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(w["up"], "up"),
                     numpy_helper.from_array(w["down"], "down")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _stand_in_graph(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """As the exporter traces it: the Gather reads a 2-row stand-in, the tied head the full table."""
    model = _graph(np.zeros((2, HIDDEN), np.float32), w)
    model.graph.initializer.append(numpy_helper.from_array(w["table"], "table_full"))
    next(n for n in model.graph.node if n.op_type == "Transpose").input[0] = "table_full"
    return model


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def _folded(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """_graph with the tied head's Transpose folded by hand: onnxruntime's whole-model
    quantizer only reaches a MatMul whose B is an initializer."""
    folded = _graph(w["table"], w)
    nodes = [n for n in folded.graph.node if n.op_type != "Transpose"]
    nodes[-1].input[1] = "table_t"
    del folded.graph.node[:]
    folded.graph.node.extend(nodes)
    folded.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w["table"].T), "table_t"))
    return folded


def _ort_whole_model(model: onnx.ModelProto, block: int, *, bits: int = 4,
                     op_types: tuple[str, ...] = ("MatMul", "Gather")) -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer on the loaded model, as the exporter used to run it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    axes = (("MatMul", 0), ("Gather", 1))
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits,
                                          op_types_to_quantize=op_types, quant_axes=axes)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4,
                                     op_types_to_quantize=op_types, quant_axes=axes, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _run(path_or_model, ids: np.ndarray) -> list[np.ndarray]:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})


def _initializer(path: Path, name: str) -> np.ndarray:
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return np.frombuffer(tensor.raw_data, dtype=np.uint8) if tensor.data_type == TensorProto.INT4 \
        else numpy_helper.to_array(tensor)


@pytest.mark.parametrize("block", [32, 64])
def test_streamed_graph_equals_onnxruntime_whole_model_quantizer(tmp_path, monkeypatch, block):
    w = _weights()
    reference = _ort_whole_model(_folded(w), block)

    # Streamed: the real rows come from the source 7 rows at a time.
    raw = _save_external(_stand_in_graph(w), tmp_path / "raw.onnx")
    monkeypatch.setattr(stream_quantize, "_TABLE_CHUNK_ELEMENTS", 7 * HIDDEN)
    reads = []

    def read(a: int, b: int) -> np.ndarray:
        reads.append((a, b))
        return w["table"][a:b]

    out = tmp_path / "out.onnx"
    counts = quantize_graph_weights(raw, out, block_size=block,
                                    tables={"table": TableSource(VOCAB, HIDDEN, read, block_size=block, fp16_scales=False)})

    assert counts == {"matmuls": 3, "tables": 1}
    assert len(reads) == -(-VOCAB // 7) and reads[-1][1] == VOCAB
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert ops == ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits", "MatMulNBits"]
    ids = np.array([[0, 5, VOCAB - 1, 17]], dtype=np.int64)
    for got, want in zip(_run(out, ids), _run(reference, ids)):
        np.testing.assert_array_equal(got, want)
    ref_path = tmp_path / "ref.onnx"
    onnx.save(reference, str(ref_path))
    for name in ("table_Q4", "table_scales", "up_Q4", "up_scales", "table_t_Q4"):
        np.testing.assert_array_equal(_initializer(out, name), _initializer(ref_path, name))


def test_fp16_table_scales_halve_the_scale_bytes_and_keep_the_rows(tmp_path):
    """Tables may keep fp16 scales (4.5 bits per weight at block 32 instead of 5): the same
    int4 values, scales rounded to fp16, rows cast back to fp32 after the lookup."""
    w = _weights()
    raw = _save_external(_stand_in_graph(w), tmp_path / "raw.onnx")
    def source(fp16_scales: bool) -> dict[str, TableSource]:
        return {"table": TableSource(VOCAB, HIDDEN, lambda a, b: w["table"][a:b], fp16_scales=fp16_scales)}

    fp32, fp16 = tmp_path / "fp32.onnx", tmp_path / "fp16.onnx"
    quantize_graph_weights(raw, fp32, block_size=32, tables=source(False))
    quantize_graph_weights(raw, fp16, block_size=32, tables=source(True))

    np.testing.assert_array_equal(_initializer(fp16, "table_Q4"), _initializer(fp32, "table_Q4"))
    scales16, scales32 = _initializer(fp16, "table_scales"), _initializer(fp32, "table_scales")
    assert scales16.dtype == np.float16 and scales16.nbytes * 2 == scales32.nbytes
    np.testing.assert_array_equal(scales16, scales32.astype(np.float16))
    ids = np.array([[0, 5, VOCAB - 1, 17]], dtype=np.int64)
    (logits16, rows16), (logits32, rows32) = _run(fp16, ids), _run(fp32, ids)
    assert rows16.dtype == np.float32
    np.testing.assert_allclose(rows16, rows32, rtol=1e-3, atol=1e-4)
    # downstream, MatMulNBits (accuracy_level 4) quantizes its activations to int8, which turns
    # the rows' fp16-sized differences into larger but still tiny logit differences
    a, b = logits16.reshape(-1, VOCAB), logits32.reshape(-1, VOCAB)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.999, cosine


@pytest.mark.parametrize("block", [32, 64])
def test_two_bit_table_rows_are_the_nearest_levels(tmp_path, monkeypatch, block):
    """A 2-bit table (onnxruntime's MatMulNBits packing, read by GatherBlockQuantized bits=2):
    a quarter of the int4 bytes, every value one of the four levels -2..1 x its block's scale
    and within one level of the fp32 value, rows still pointing the fp32 way. Streamed in
    chunks of 7 rows, as a real table is."""
    w = _weights()
    raw = _save_external(_stand_in_graph(w), tmp_path / "raw.onnx")
    monkeypatch.setattr(stream_quantize, "_TABLE_CHUNK_ELEMENTS", 7 * HIDDEN)
    out = tmp_path / "out.onnx"
    quantize_graph_weights(raw, out, block_size=32, matmuls=False,
                           tables={"table": TableSource(VOCAB, HIDDEN, lambda a, b: w["table"][a:b], bits=2,
                                                        block_size=block)})
    node = next(n for n in onnx.load(str(out), load_external_data=False).graph.node
                if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in node.attribute}["bits"] == 2
    assert _initializer(out, "table_Q2").shape == (VOCAB, HIDDEN // 4)
    scales = _initializer(out, "table_scales").astype(np.float32)
    assert scales.shape == (VOCAB, HIDDEN // block)
    ids = np.arange(VOCAB, dtype=np.int64)[None]
    rows = _run(out, ids)[1][0]
    step = np.repeat(scales, block, axis=1)
    levels = rows / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert set(np.unique(np.round(levels))) <= {-2.0, -1.0, 0.0, 1.0}
    assert (np.abs(rows - w["table"]) <= np.abs(step) * 1.01 + 1e-6).all()
    cosine = (rows * w["table"]).sum(-1) / np.linalg.norm(rows, axis=-1) / np.linalg.norm(w["table"], axis=-1)
    assert cosine.mean() > 0.85, cosine.mean()


def test_eight_bit_matmuls_are_onnxruntimes_and_table_rows_the_nearest_levels(tmp_path, monkeypatch):
    """int8 weights (the `int8` recipe): MatMulNBits bits=8 with the bytes onnxruntime's
    whole-model quantizer writes, and an 8-bit GatherBlockQuantized table, which that quantizer
    cannot write (its Gather path is 4-bit only): one byte per value, each the nearest of the
    levels -128..127 x its block's scale. Block 128 is wider than the rows (64): the partial
    block is cut back to the rows' width. Streamed in chunks of 7 rows."""
    w = _weights()
    reference = tmp_path / "ref.onnx"
    onnx.save(_ort_whole_model(_folded(w), 128, bits=8, op_types=("MatMul",)), str(reference))
    raw = _save_external(_stand_in_graph(w), tmp_path / "raw.onnx")
    monkeypatch.setattr(stream_quantize, "_TABLE_CHUNK_ELEMENTS", 7 * HIDDEN)
    out = tmp_path / "out.onnx"
    table = TableSource(VOCAB, HIDDEN, lambda a, b: w["table"][a:b], bits=8, block_size=128, fp16_scales=False)
    counts = quantize_graph_weights(raw, out, bits=8, block_size=128, tables={"table": table})

    assert counts == {"matmuls": 3, "tables": 1}
    for name in ("up_Q8", "up_scales", "down_Q8", "down_scales", "table_t_Q8", "table_t_scales"):
        np.testing.assert_array_equal(_initializer(out, name), _initializer(reference, name))
    nodes = onnx.load(str(out), load_external_data=False).graph.node
    assert [({a.name: a.i for a in n.attribute}["bits"], {a.name: a.i for a in n.attribute}.get("accuracy_level"))
            for n in nodes] == [(8, None), (8, 4), (8, 4), (8, 4)]
    assert _initializer(out, "table_Q8").shape == (VOCAB, HIDDEN)
    scales = _initializer(out, "table_scales")
    assert scales.shape == (VOCAB, 1)
    ids = np.arange(VOCAB, dtype=np.int64)[None]
    logits, rows = _run(out, ids)
    # the scale maps a block's largest magnitude to level -128: its mirror value clips to 127
    nearest = np.clip(np.round(w["table"] / scales), -128, 127) * scales
    np.testing.assert_allclose(rows[0], nearest, rtol=0, atol=1e-6)
    want = _run(_graph(w["table"], w), ids)[0]
    cosine = (logits * want).sum(-1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() > 0.999, cosine.min()


def test_big_tensors_start_on_mappable_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_quantize, "_ALIGN_FROM", 1024)
    w = _weights()
    raw = _save_external(_stand_in_graph(w), tmp_path / "raw.onnx")
    out = tmp_path / "out.onnx"
    quantize_graph_weights(raw, out, block_size=32, matmuls=False,
                           tables={"table": TableSource(VOCAB, HIDDEN, lambda a, b: w["table"][a:b])})
    model = onnx.load(str(out), load_external_data=False)
    for tensor in model.graph.initializer:
        info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
        if info.get("length", 0) >= 1024:
            assert info["offset"] % (1 << 16) == 0, tensor.name
    # the fp32 MatMuls were left alone and the original stand-in and its data are gone
    names = {t.name for t in model.graph.initializer}
    assert {"up", "down", "table_full", "table_Q4", "table_scales"} <= names and "table" not in names


def test_a_table_no_gather_reads_is_an_error(tmp_path):
    w = _weights()
    raw = _save_external(_graph(w["table"], w), tmp_path / "raw.onnx")
    with pytest.raises(ExportError, match="no Gather reads missing.weight"):
        quantize_graph_weights(raw, tmp_path / "out.onnx", block_size=32,
                               tables={"missing.weight": TableSource(4, HIDDEN, lambda a, b: w["table"][a:b])})


def test_graph_export_keeps_no_reference_to_the_traced_weights(tmp_path):
    """After export_graph returns, dropping the module frees its weights: the decoder's fp32
    weights must be gone before its graph is quantized (onnxscript's rewrite rules used to
    keep the last graph, and every weight in it, alive)."""
    import gc
    import weakref

    import torch

    from edgekit.export.onnx.graph_export import GraphSpec, export_graph

    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    weight = weakref.ref(module[0].weight)
    spec = GraphSpec(name="mlp", module=module, args=(torch.randn(2, 64),), input_names=("x",),
                     output_names=("y",), dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_graph(spec, tmp_path / "mlp.onnx")
    del spec, module
    gc.collect()
    assert weight() is None
