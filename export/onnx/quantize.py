"""ONNX weight quantization with onnxruntime's own tools.

- int4: MatMulNBits (block-wise, symmetric) for MatMul weights and GatherBlockQuantized
  for embedding tables; accuracy_level=4 (int8 compute) because without it int4 decodes
  2x slower on CPU (shared/EXPORT-NOTES.md).
- int8: the same quantizer with bits=8 for tables, and dynamic int8 (DynamicQuantizeLinear
  + MatMulInteger) for MatMuls.
- fp16: weights and compute in fp16 for GPUs (the Jetson); graph inputs/outputs stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import onnx

from edgekit.errors import ExportError


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizers log through the root logger at INFO (one line per tensor)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int4(model: onnx.ModelProto, *, block_size: int, ops: tuple[str, ...] = ("MatMul",)) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    return _weight_only(model, bits=4, block_size=block_size, ops=ops,
                        config_cls=DefaultWeightOnlyQuantConfig, quantizer_cls=MatMulNBitsQuantizer)


def quantize_table(model: onnx.ModelProto, *, bits: int, block_size: int) -> onnx.ModelProto:
    """Embedding tables (Gather) -> GatherBlockQuantized with 4 or 8 bit weights."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    return _weight_only(model, bits=bits, block_size=block_size, ops=("Gather",),
                        config_cls=DefaultWeightOnlyQuantConfig, quantizer_cls=MatMulNBitsQuantizer)


def _weight_only(model, *, bits, block_size, ops, config_cls, quantizer_cls) -> onnx.ModelProto:
    config = config_cls(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits,
                        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    try:
        with _quiet():
            quantizer = quantizer_cls(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                      op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)),
                                      algo_config=config)
            quantizer.process()
    except Exception as exc:
        raise ExportError(f"int{bits} quantization failed: {exc}") from exc
    return quantizer.model.model


def quantize_int8_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet():
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise ExportError(f"int8 dynamic quantization failed: {exc}") from exc


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
