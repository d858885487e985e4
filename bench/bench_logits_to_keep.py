"""ONNX prefill with the last position's logits only, against every position's, on one bundle.

    one ONNX bundle, one process, the runner's backend: warm-up, then R rounds of
        prefill P tokens feeding logits_to_keep=1 (what edgekit's runner feeds) ─► reset
        prefill P tokens feeding nothing (the graph's default: every position, what
        onnxruntime-genai reads) ─► reset
    median prefill tok/s of each, and their ratio in the same run

The same graph and weights on both sides, interleaved, so the ratio is what the skipped
[P-1, vocab] head costs (export/onnx/logits_to_keep.py).

Usage: .venv/bin/python bench/bench_logits_to_keep.py BUNDLE [--prompt-tokens 128] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runtimes import prompt_ids  # noqa: E402
from common import header, table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("bundle", type=Path, help="an ONNX edgekit bundle")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np

    from edgekit.bundle import load_bundle
    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    backend = OnnxBackend(load_bundle(args.bundle), threads=args.threads)
    if not backend._keeps_last_logits:
        raise SystemExit(f"bench_logits_to_keep: {args.bundle} has no logits_to_keep input (exported before it)")
    ids = np.asarray(prompt_ids(args.prompt_tokens), np.int64)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    backend.forward(ids[:8])  # warm-up
    backend.reset()
    for _ in range(args.rounds):
        for last_only in (True, False):
            backend.__dict__["_keeps_last_logits"] = last_only  # False: feed nothing, the graph's default
            started = time.perf_counter()
            logits = backend.forward(ids)
            speeds[last_only].append(len(ids) / (time.perf_counter() - started))
            assert logits.shape[0] == (1 if last_only else len(ids))
            backend.reset()

    print(header("ONNX prefill: logits_to_keep", packages=("onnxruntime",)))
    print(f"- bundle: `{args.bundle}`; {args.prompt_tokens}-token prompt, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, median (min-max)\n")
    rows = [[label, f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"]
            for label, v in (("last position only (logits_to_keep=1, edgekit's runner)", speeds[True]),
                             ("every position (nothing fed, onnxruntime-genai)", speeds[False]))]
    print(table(["logits", "prefill tok/s"], rows))
    print(f"\nratio: {statistics.median(speeds[True]) / statistics.median(speeds[False]):.2f}x")


if __name__ == "__main__":
    main()
