"""Fold Transpose(initializer) into a transposed initializer.

Why: the dynamo exporter keeps `F.linear(x, W)` with a tied weight (Gemma's lm_head
shares the token embedding) as MatMul(x, Transpose(W)); onnxruntime's MatMulNBits
quantizer only quantizes MatMuls whose weight is an initializer, so the biggest matrix
of the decoder would stay fp32. Can go when the exporter folds constant transposes of
shared weights itself.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper


def fold_transposed_weights(model: onnx.ModelProto) -> int:
    """Rewrite in place; returns how many Transpose nodes were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        source = inits[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(source)
        new = numpy_helper.from_array(array.transpose(perm).copy(), name=node.output[0])
        graph.initializer.append(new)
        graph.node.remove(node)
        consumers[source.name] -= 1
        if consumers[source.name] == 0:
            graph.initializer.remove(source)
        folded += 1
    return folded
