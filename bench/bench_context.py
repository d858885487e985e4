"""Decode speed and memory against the length of the conversation, for bundles side by side.

    for each prompt length P, for each bundle (alternating):
        bench_runtimes' child: bundle evicted ─► load ─► prefill P random tokens in the engine's
        chunks ─► reset VmHWM ─► D greedy steps ─► decode tok/s, VmHWM, RssAnon

What a conversation costs as it grows (attention reads the history; caches grow with it),
and an A/B of two exports of one checkpoint in the same run (the figures of bench/RESULTS.md
section 13: ONNX sliding layers with the whole history vs their last window).

Usage: .venv/bin/python bench/bench_context.py BUNDLE [BUNDLE...] [--prompt-tokens 128,1024,4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runtimes import run_bundle_child  # noqa: E402
from common import header, mib, table  # noqa: E402


def _middle(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path, help="edgekit bundles (ONNX or ExecuTorch)")
    parser.add_argument("--prompt-tokens", default="128,1024,4096", help="comma list of prompt lengths")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="prefill+decode rounds per child (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    missing = [str(b) for b in args.bundles if not b.is_dir()]
    if missing:
        raise SystemExit(f"bench_context: no bundle at {', '.join(missing)}")
    lengths = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]

    print(header("Decode against context length", packages=("onnxruntime", "executorch")))
    rows = []
    for length in lengths:
        for bundle in args.bundles:
            child = argparse.Namespace(threads=args.threads, prompt_tokens=length, decode_steps=args.decode_steps,
                                       repeats=args.repeats)
            r = run_bundle_child(child, bundle)
            rows.append([str(length), bundle.name, f"{_middle(r['prefill_tok_s']):.1f}",
                         f"{_middle(r['decode_tok_s']):.2f}", mib(r["decode_peak_rss_bytes"]),
                         mib(r["status_after_decode"].get("RssAnon")), mib(r["life_peak_rss_bytes"])])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(table(["prompt tokens", "bundle", "prefill tok/s", "decode tok/s", "peak RSS while decoding",
                 "anon after decode", "peak RSS, whole child"], rows))


if __name__ == "__main__":
    main()
