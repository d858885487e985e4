"""Where a Core ML bundle keeps the per-layer embedding table: inside a program, or as a row file.

    .venv/bin/python bench/bench_coreml_tables.py [--rows 262144] [--columns 512] [--dtype int4]

Both ways from the same random table (rows x columns, E2B's vocabulary; 512 columns is
e2b-shape cut to 2 layers, E2B's 35 layers have 8960):
- program: a Core ML gather program (`ids -> rows`) converted by coremltools, its table
  compressed with `linear_quantize_weights` (int4 per block 32, or int8 per channel);
- row file: edgekit's export/coreml/embedding_tables.py layout.
Each in a fresh process; prints bytes on disk, seconds to write, peak RSS of the writer, and
the cost of opening it and reading 128 rows here (the row file through numpy memmap; the
program through the numpy evaluator, which is not what a device does: Core ML's own load
cost cannot be measured on Linux).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
way, rows, columns, dtype, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
table = torch.randn(rows, columns) * 0.02
start = time.perf_counter()
if way == "program":
    import coremltools as ct
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights
    from edgekit.export.coreml.torch_ops import coremltools_quiet
    module = torch.nn.Embedding(rows, columns, _weight=table).eval()
    ids = torch.zeros(1, 8, dtype=torch.int32)
    with torch.no_grad(), coremltools_quiet():
        traced = torch.jit.trace(module, ids)
        model = ct.convert(traced, inputs=[ct.TensorType("ids", shape=(1, 8), dtype=np.int32)],
                           minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram")
        config = (OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32)
                  if dtype == "int4" else OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                                  granularity="per_channel"))
        if dtype != "float16":
            model = linear_quantize_weights(model, OptimizationConfig(op_type_configs={"gather": config}))
        model.save(str(out))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
else:
    from edgekit.export.coreml.embedding_tables import write_table
    from edgekit.runtimes.embedding_tables import TableLayout
    layout = TableLayout(rows, columns, dtype, 32 if dtype == "int4" else columns)
    write_table(lambda i: table[i], layout, out)
    size = out.stat().st_size
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = np.random.default_rng(0).integers(0, rows, 128)
start = time.perf_counter()
if way == "program":
    from edgekit.export.coreml.mil_eval import SavedProgram
    program = SavedProgram(out)
    for i in range(0, 128, 8):
        program.run("main", {"ids": ids[i:i + 8].reshape(1, 8).astype(np.int32)})
else:
    from edgekit.runtimes.embedding_tables import EmbeddingTable
    EmbeddingTable(out, layout).lookup(ids)
read = time.perf_counter() - start
print(json.dumps({"way": way, "bytes": size, "write_s": seconds, "peak_rss": peak, "open_and_read_128_s": read}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--columns", type=int, default=512)
    parser.add_argument("--dtype", choices=("int4", "int8", "float16"), default="int4")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for way, name in (("row-file", "table.bin"), ("program", "table.mlpackage")):
            out = subprocess.run([sys.executable, "-c", _CHILD, way, str(args.rows), str(args.columns), args.dtype,
                                  str(Path(tmp) / name)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.rows} x {args.columns} table, {args.dtype}")
    print(f"| way | on disk (MB) | write (s) | writer peak RSS (MiB) | open + read 128 rows here (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['way']} | {r['bytes'] / 1e6:.1f} | {r['write_s']:.1f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['open_and_read_128_s']:.3f} |")


if __name__ == "__main__":
    main()
