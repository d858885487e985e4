"""Where an ExecuTorch bundle's decode step goes: ExecuTorch's own profiler (ETDump), per event.

    bundle's model.pte ─► the bindings with ETDump on (the runner's kernels loaded)
           ─► one prefill in the engine's 128-token chunks, N greedy decode steps
           ─► ETDump ─► executorch.devtools.Inspector ─► text_decoder's ms per decode step,
              by event (XNNPACK's operators inside the delegates, the kernels outside them)

XNNPACK names its operators by kind and a counter ("Fully Connected (NC, QDU8, F32, QB4W)
GEMM #1"); one name can occur in several delegates, so a row sums every occurrence. Profiling
adds a little time per event; compare bundles in the same run, not with bench_runtimes'
decode tok/s. Needs the host install (executorch.devtools).

    .venv/bin/python bench/profile_et_decode.py BUNDLE [BUNDLE ...] [--steps 32]
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from common import command_line, profile_arguments, table

PREFILL_CHUNK = 128  # edgekit.runtimes.engine feeds prompts in chunks this long


def profile(bundle_path: Path, *, prompt_tokens: int, steps: int) -> dict:
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from edgekit.bundle import load_bundle
    from edgekit.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING
    from edgekit.runtimes.backends import executorch_backend

    bundle = load_bundle(bundle_path)
    try:  # the quantized embedding kernels register on import, as in the runner
        import executorch.kernels.quantized  # noqa: F401
    except ImportError:
        pass
    if executorch_backend.needs_llm_ops(bundle.manifest):
        executorch_backend._load_llm_kernels()
    pte = bundle.file(bundle.manifest.method(METHOD_TEXT_DECODER).file)
    module = portable_lib._load_for_executorch(str(pte), enable_etdump=True)

    def forward(ids: np.ndarray, position: int) -> torch.Tensor:
        rows = module.run_method(METHOD_TOKEN_EMBEDDING, [torch.from_numpy(ids[None].copy())])[0]
        return module.run_method(METHOD_TEXT_DECODER, [rows, torch.arange(position, position + len(ids))])[0]

    prompt = np.random.default_rng(0).integers(1000, 200_000, prompt_tokens)
    for start in range(0, prompt_tokens, PREFILL_CHUNK):
        logits = forward(prompt[start:start + PREFILL_CHUNK], start)
    token = int(logits[0, -1].argmax())
    start_s = time.perf_counter()
    for step in range(steps):
        token = int(forward(np.array([token]), prompt_tokens + step)[0, -1].argmax())
    decode_s = time.perf_counter() - start_s

    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "decode.etdp"
        module.write_etdump_result_to_file(str(etdump))
        with warnings.catch_warnings():  # no debug buffer: tensor values are not wanted here
            warnings.simplefilter("ignore", UserWarning)
            blocks = Inspector(etdump_path=str(etdump)).event_blocks
    # Each block is one method; each of its events holds one duration per run of the method.
    # text_decoder is the block with the most events; its last `steps` runs are the decode steps.
    decoder = max(blocks, key=lambda block: len(block.events))
    per_step: collections.Counter = collections.Counter()
    occurrences: collections.Counter = collections.Counter()
    for event in decoder.events:
        if event.perf_data is None:
            continue
        per_step[event.name] += statistics.median(event.perf_data.raw[-steps:])
        occurrences[event.name] += 1
    run_ms = per_step.pop("Method::execute", float("nan"))
    for framing in ("DELEGATE_CALL", "OPERATOR_CALL"):  # totals of the rows below, not events
        per_step.pop(framing, None)
    return {"bundle": bundle_path.name, "decode_tok_s": steps / decode_s, "run_ms": run_ms,
            "events": [(name, ms, occurrences[name]) for name, ms in per_step.most_common()]}


def main(argv: list[str] | None = None) -> None:
    args = profile_arguments(__doc__, bundles="ExecuTorch", steps=32, top=15, listed="events").parse_args(argv)
    print(f"- command: `{command_line()}`")
    for bundle in args.bundles:
        result = profile(bundle, prompt_tokens=args.prompt_tokens, steps=args.steps)
        print(f"\n{result['bundle']}: {result['decode_tok_s']:.2f} tok/s while profiled, "
              f"text_decoder run {result['run_ms']:.2f} ms per decode step (median)\n")
        print(table(["event", "ms per step (median)", "occurrences"],
                    [[name, f"{ms:.3f}", str(n)] for name, ms, n in result["events"][:args.top]]))


if __name__ == "__main__":
    main()
