"""ONNX weight quantization with onnxruntime's own tools.

- int4 / int8 (and 2-bit tables): stream_quantize.py (weight-only MatMulNBits and
  GatherBlockQuantized, one weight at a time).
- fp16: weights and compute in fp16 for GPUs (the Jetson); graph inputs/outputs stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import onnx


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


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
