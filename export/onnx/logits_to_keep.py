"""The decoder's optional `logits_to_keep` input: the logits of the last K positions only.

The tied lm_head is 262144 x hidden multiply-adds per position: a 128-token prefill spends
more on logits nobody reads than on the layers at 4 layers, and a sixth of the step at full
E2B depth. The graph slices the final norm's output to its last K positions before the head.

`logits_to_keep` is a graph input that is also an initializer (ONNX's overridable default),
0 = every position. onnxruntime-genai does not feed it and binds a [B, S, V] logits buffer,
so it gets every position as before; edgekit's runner feeds 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit import onnx_layout as L
from edgekit.errors import ExportError

_HEAD_OPS = ("MatMul", "MatMulNBits")
# what lies between the head and the logits output: the softcap's Div, Tanh, Mul
_ELEMENTWISE_OPS = ("Div", "Tanh", "Mul")


def _head_matmul(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The MatMul that makes the logits: walk up the logits output's first inputs."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(L.LOGITS)
    while node is not None and node.op_type in _ELEMENTWISE_OPS:
        node = producer.get(node.input[0])
    if node is None or node.op_type not in _HEAD_OPS:
        raise ExportError(f"decoder graph: no MatMul found above its {L.LOGITS!r} output")
    return node


def add_logits_to_keep(path: Path) -> None:
    """Give the decoder graph at `path` (weights stay in its external data file, unread) the
    `logits_to_keep` input, slicing the lm_head's input to the last K positions (0: all)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    head = _head_matmul(graph)
    name = L.LOGITS_TO_KEEP
    constants = {name: 0,  # the input's default, as an initializer of the same name
                 f"{name}/axis0": [0], f"{name}/axis": [1], f"{name}/end": [np.iinfo(np.int64).max]}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, []))
    start, sliced = f"{name}/start", f"{name}/hidden"
    nodes = [
        # Slice's negative start counts from the end; -0 is the first position: every one
        helper.make_node("Neg", [name], [f"{name}/negated"]),
        helper.make_node("Unsqueeze", [f"{name}/negated", f"{name}/axis0"], [start]),
        helper.make_node("Slice", [head.input[0], start, f"{name}/end", f"{name}/axis"], [sliced]),
    ]
    at = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    head.input[0] = sliced
    onnx.save(model, str(path))
