"""Runner overhead: Engine.generate (greedy) against backend.forward in a bare loop, same tokens.

    round k:  A  engine.reset(); list(engine.generate(messages, greedy, max_new_tokens=N))
                 -> the tokens it fed and engine.last_stats (prefill_s, decode_s)
              B  backend.reset(); backend.forward(prompt ids); then backend.forward([t]) for
                 the same tokens A fed, timed
    rounds alternate A, B so machine noise hits both; medians are compared.

The runner's decode loop feeds every token it emits back through the backend (also the
last one when it stops at max_new_tokens), so both sides time the same number of forwards;
the difference is sampling, stop checks, detokenizing and streaming. Target: the runner
within 5% of the bare loop. ONNX only, in this process (no torch is imported).

Usage: .venv/bin/python bench/bench_runner_overhead.py [--bundle B] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_WORKDIR, ensure_bundle, ensure_checkpoint, header, table, verdict  # noqa: E402

OVERHEAD_TARGET = 0.05  # runner decode time over bare-loop decode time, at most 1.05
DEFAULT_PROMPT = ("Summarise in three sentences why a memory-mapped embedding table keeps the resident memory "
                  "of a small language model far below its file size on a single-board computer.")


def _default_bundle(args: argparse.Namespace) -> Path:
    checkpoint, _ = ensure_checkpoint(args.workdir, layers=args.layers)
    bundle = args.workdir / f"{checkpoint.name}-pi5-8gb-{args.quant}-text.edgekit"
    record, measured = ensure_bundle(checkpoint, device="pi5-8gb", quant=args.quant, modalities="text", bundle=bundle,
                                     log=args.workdir / f"{bundle.name}.log")
    if record is None:
        raise SystemExit(f"export failed: {measured.killed_reason or measured.output[-3000:]}")
    return bundle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle to run (default: the e2b-shape int4 text bundle that "
                        "bench_runtimes.py writes under --workdir, exported if missing)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--layers", type=int, default=4, help="for the default bundle")
    parser.add_argument("--quant", default="int4", help="for the default bundle")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of each greedy generation")
    parser.add_argument("--repeats", type=int, default=5, help="A/B rounds")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message")
    args = parser.parse_args(argv)

    import numpy as np

    from edgekit.runtimes.engine import Engine
    from edgekit.runtimes.sampling import SamplingParams

    print(header("Runner overhead: Engine.generate vs a bare backend.forward loop", packages=("onnxruntime",)))
    bundle = args.bundle or _default_bundle(args)
    engine = Engine.open(bundle, threads=args.threads)
    backend = engine.backend
    messages = [{"role": "user", "content": args.prompt}]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    list(engine.generate(messages, sampling=sampling))  # warm-up: sessions, first-run allocations

    runner_s, bare_s, runner_reported, wall_runner, wall_bare = [], [], [], [], []
    fed: list[int] = []
    prompt: list[int] = []
    stop_reason = ""
    for _ in range(args.repeats):
        # A: the runner
        engine.reset()
        start = time.perf_counter()
        pieces = list(engine.generate(messages, sampling=sampling))
        wall_runner.append(time.perf_counter() - start)
        stats = engine.last_stats
        seen = list(engine._cached_ids)  # prompt + every token the runner fed back
        prompt, fed = seen[:stats.prompt_tokens], seen[stats.prompt_tokens:]
        stop_reason = stats.stop_reason
        runner_s.append(stats.decode_s)
        runner_reported.append(stats.decode_tok_s)
        # B: the same forwards, bare
        backend.reset()
        start = time.perf_counter()
        backend.forward(np.asarray(prompt, np.int64))
        mid = time.perf_counter()
        for token in fed:
            backend.forward(np.asarray([token], np.int64))
        end = time.perf_counter()
        bare_s.append(end - mid)
        wall_bare.append(end - start)

    n = len(fed)
    med = statistics.median
    runner_rate, bare_rate = n / med(runner_s), n / med(bare_s)
    overhead = med(runner_s) / med(bare_s) - 1
    per_round = [r / b - 1 for r, b in zip(runner_s, bare_s)]
    print(f"- bundle: `{bundle}`")
    print(f"- prompt: {len(prompt)} tokens (chat template applied); greedy, max_new_tokens={args.new_tokens}; "
          f"stop reason: {stop_reason}; {n} decode forwards per generation; {args.threads} threads; "
          f"{args.repeats} A/B rounds, median (min-max)")
    print(f"- text streamed in the last round: {sum(len(p) for p in pieces)} characters\n")

    def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
        return fmt.format(med(xs)) + (f" ({fmt.format(min(xs))}-{fmt.format(max(xs))})" if len(xs) > 1 else "")

    rows = [
        ["Engine.generate (runner)", spread(runner_s, "{:.3f}"), f"{runner_rate:.2f}", spread(runner_reported),
         spread(wall_runner, "{:.3f}")],
        ["backend.forward bare loop", spread(bare_s, "{:.3f}"), f"{bare_rate:.2f}", "-", spread(wall_bare, "{:.3f}")],
    ]
    print(table(["loop", "decode s", "decode forwards/s", "runner's own decode_tok_s", "wall s (prefill + decode)"],
                rows))
    print()
    print(table(["ratio", "measured", "target", ""], [
        ["runner decode time / bare decode time - 1 (medians)", f"{overhead:+.1%}", f"<= +{OVERHEAD_TARGET:.0%}",
         verdict(overhead <= OVERHEAD_TARGET)],
        ["same, per round (median, min-max)", spread([p * 100 for p in per_round], "{:+.1f}%"), "-", ""],
        ["runner time per decode step over the bare loop's (medians)",
         f"{(med(runner_s) - med(bare_s)) / n * 1e3:+.2f} ms", "-", ""],
    ]))
    if stop_reason == "max_new_tokens":
        print(f"\nNote: GenerationStats.decode_tok_s counts {n - 1} tokens for the {n} forwards the decode loop "
              "runs (the first token comes from the prefill; the last one is fed back too), so it reads "
              f"{1 - (n - 1) / n:.1%} below forwards/s.")


if __name__ == "__main__":
    main()
