"""ONNX weight quantization with onnxruntime's own tools.

- int4: stream_quantize.py (MatMulNBits and GatherBlockQuantized, one weight at a time).
- int8: dynamic int8 (DynamicQuantizeLinear + MatMulInteger) for MatMuls.
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
def quiet_ort_logs() -> Iterator[None]:
    """onnxruntime's quantizers log through the root logger at INFO (one line per tensor)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet_ort_logs():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise ExportError(f"int8 dynamic quantization failed: {exc}") from exc


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
