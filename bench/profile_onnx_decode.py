"""Where an ONNX bundle's decode step goes: onnxruntime's own profiler, per operator type.

    bundle ─► the runner's OnnxBackend (its session options, profiling on)
           ─► one prefill, N greedy decode steps ─► profile JSON of the decoder session
           ─► kernel time per decode step, by op type and for the slowest nodes

Profiling adds a little time per node; compare bundles in the same run, not with
bench_runtimes' decode tok/s.

    .venv/bin/python bench/profile_onnx_decode.py BUNDLE [BUNDLE ...] [--steps 64]
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import numpy as np

from common import command_line, profile_arguments, table


def _profiled_session_options() -> None:
    """Every onnxruntime session created from here on writes a profile (the runner's other
    settings unchanged)."""
    import onnxruntime

    base = onnxruntime.SessionOptions

    class ProfiledOptions(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = "/tmp/edgekit-ort-profile"

    onnxruntime.SessionOptions = ProfiledOptions


def profile(bundle: Path, *, prompt_tokens: int, steps: int, threads: int) -> dict:
    from edgekit.bundle import load_bundle
    from edgekit.manifest import METHOD_TEXT_DECODER
    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    backend = OnnxBackend(load_bundle(bundle), threads=threads)
    prompt = np.random.default_rng(0).integers(1000, 200_000, prompt_tokens)
    token = int(backend.forward(prompt)[-1].argmax())
    start = time.perf_counter()
    for _ in range(steps):
        token = int(backend.forward(np.array([token]))[-1].argmax())
    decode_s = time.perf_counter() - start
    events = json.loads(Path(backend._sessions[METHOD_TEXT_DECODER].end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_runs = runs[-steps:]
    first = decode_runs[0]["ts"]
    by_op, nodes_per_op, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            by_op[e["args"]["op_name"]] += e["dur"]
            nodes_per_op[e["args"]["op_name"]] += 1
            by_node[(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])] += e["dur"]
    return {
        "bundle": bundle.name,
        "decode_tok_s": steps / decode_s,
        "run_ms": sum(r["dur"] for r in decode_runs) / steps / 1000,
        "ops": [(op, us / steps / 1000, nodes_per_op[op] // steps) for op, us in by_op.most_common()],
        "nodes": [(name, op, us / steps / 1000) for (name, op), us in by_node.most_common(5)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = profile_arguments(__doc__, bundles="ONNX", steps=64, top=12, listed="op types")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    _profiled_session_options()
    print(f"- command: `{command_line()}`")
    for bundle in args.bundles:
        result = profile(bundle, prompt_tokens=args.prompt_tokens, steps=args.steps, threads=args.threads)
        print(f"\n{result['bundle']}: {result['decode_tok_s']:.2f} tok/s while profiled, "
              f"decoder run {result['run_ms']:.2f} ms per decode step\n")
        print(table(["op type", "ms per step", "nodes"],
                             [[op, f"{ms:.3f}", str(n)] for op, ms, n in result["ops"][:args.top]]))
        print()
        print(table(["slowest node", "op type", "ms per step"],
                             [[name, op, f"{ms:.3f}"] for name, op, ms in result["nodes"]]))


if __name__ == "__main__":
    main()
