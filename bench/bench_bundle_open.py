"""What the integrity check costs when a bundle is opened: `load_bundle` at each verify level.

    .venv/bin/python bench/bench_bundle_open.py BUNDLE [--rounds 3]

Each measurement runs in a fresh process (no Python-level caching) with its own empty
integrity cache ($XDG_CACHE_HOME), so "first open" hashes every file and "later open"
finds them all remembered. Files are in the page cache after the first round (the first
round's first open reads them from disk). Prints a table; medians with min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
from edgekit.bundle import load_bundle
path, levels = sys.argv[1], sys.argv[2].split(",")
load_bundle(path, verify="none")  # untimed: the first call's lazy imports are not the check's cost
times = []
for level in levels:
    start = time.perf_counter()
    load_bundle(path, verify=level)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""

# (label, verify level, whether an earlier process opened the bundle with the same cache)
_CASES = (
    ("sizes only (a stat per file, no hash)", "sizes", False),
    ("first open (every file hashed, remembered)", "cached", False),
    ("later open, another process (remembered: a stat per file)", "cached", True),
    ("full (every file hashed, cache ignored)", "full", False),
)


def _run(bundle: Path, level: str, *, primed: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="edgekit-cache-") as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        for _ in range(2 if primed else 1):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), level], env=env,
                                 capture_output=True, text=True, check=True).stdout
        return json.loads(out)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file())
    files = sum(1 for f in args.bundle.rglob("*") if f.is_file())
    print(f"bundle {args.bundle.name}: {size / 1e9:.2f} GB in {files} files; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")
    print()
    print("| open | median | min - max |")
    print("|---|---|---|")
    for label, level, primed in _CASES:
        seconds = [_run(args.bundle, level, primed=primed) for _ in range(args.rounds)]
        print(f"| {label} | {_fmt(statistics.median(seconds))} | {_fmt(min(seconds))} - {_fmt(max(seconds))} |")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    main()
