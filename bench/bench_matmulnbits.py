"""One MatMulNBits node at the tied lm_head's shape, by block size and accuracy level.

    random int4 weights [N, K] (E2B's lm_head: 262,144 x 1,536) ─► a one-node graph
        ─► onnxruntime CPU, 2 threads, one token (M = 1) ─► median ms per call

What the block-size choice of the lm_head costs a decode step (bench/RESULTS.md section 11).

    .venv/bin/python bench/bench_matmulnbits.py [--n 262144] [--k 1536]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import command_line, table


def _graph(k: int, n: int, block: int, accuracy_level: int, rng: np.random.Generator):
    from onnx import TensorProto, helper, numpy_helper

    blocks = k // block
    weight = numpy_helper.from_array(rng.integers(0, 255, (n, blocks, block // 2), dtype=np.uint8), "w")
    scales = numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 0.01, "s")
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "lm_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [weight, scales])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def time_call(model, k: int, *, threads: int, calls: int) -> list[float]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=262_144, help="output columns (the vocabulary)")
    parser.add_argument("--k", type=int, default=1_536, help="input width (the hidden size)")
    parser.add_argument("--blocks", default="32,64,128,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        for level in (4, 0):
            times = time_call(_graph(args.k, args.n, block, level, rng), args.k, threads=args.threads,
                              calls=args.calls)
            rows.append([str(block), f"{level} ({'int8' if level == 4 else 'fp32'} compute)",
                         f"{statistics.median(times) * 1000:.2f}", f"{min(times) * 1000:.2f}",
                         # int8 compute prepacks an fp32 scale and an fp32 block sum per block
                         f"{4 + 64 / block:.2f}" if level == 4 else "-"])
    print(f"- command: `{command_line()}`\n")
    print(table(["block", "accuracy_level", "median ms", "min ms", "prepacked bits / weight (int8 compute)"], rows))


if __name__ == "__main__":
    main()
