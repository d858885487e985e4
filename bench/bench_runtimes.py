"""ONNX and ExecuTorch bundles against eager transformers fp32, on one `e2b-shape` checkpoint.

    e2b-shape --layers N checkpoint ─► `edgekit export --device pi5-8gb --quant fp32|int4` (ONNX)
                                     ─► `edgekit export --device android-flagship --quant fp32|8da4w-emb4`
        (measured child: export time, its peak RSS) ─► bundle size on disk
    each runtime in its own child process, through the runner's own backend:
        bundle evicted from the page cache ─► load (sessions / program + methods / from_pretrained)
        ─► warm-up ─► reset
        ─► prefill P random tokens ─► reset VmHWM ─► D greedy decode steps ─► VmHWM, RssAnon, RssFile
    and each ExecuTorch bundle again through ExecuTorch's C++ runtime (bench/et_decode, built
    against the executorch wheel's libraries; what an app holds), same workload

Peak RSS while decoding is the child's VmHWM after `clear_refs` reset it at the start of the
decode loop, so the load and the prefill do not count; the whole-life peak (largest VmHWM
seen before each reset: clear_refs resets ru_maxrss too) is
shown beside it. The issues' targets: ONNX int4 and ExecuTorch 8da4w decode >= 5x eager fp32
decode; peak RSS while decoding < 60% of the bundle size (the per-layer table should stay
memory-mapped).

Usage: .venv/bin/python bench/bench_runtimes.py [--layers 4] [--repeats 3] [--bundles onnx:int4,...] [--investigate]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import et_cpp  # noqa: E402
from common import (DEFAULT_WORKDIR, PYTHON, REPO, drop_from_page_cache, emit_result, ensure_bundle,  # noqa: E402
                    ensure_checkpoint, gb, header, mapped_rss, mib, proc_status, reset_peak_rss, run_child, table,
                    verdict, without_mlock_privilege)

DEVICES = {"onnx": "pi5-8gb", "executorch": "android-flagship"}  # each format's profile
DEFAULT_BUNDLES = "onnx:fp32,onnx:int4,executorch:fp32,executorch:8da4w-emb4"
# Rows the decode target applies to: the issues' recipe families, any block / group size
# (int4: MatMulNBits block 32/64/128; 8da4w: group 32/64/128) and table width.
QUANTIZED_PREFIXES = ("onnx int4", "executorch 8da4w")
CPP_ROW = ", C++ runtime (et_decode)"  # suffix of the rows run by bench/et_decode
# et_decode --lean-memory: planned memory in anonymous mappings the app passes to load_method
# (resident as written) and the program's mappings random-access, ExecuTorch's public API
CPP_LEAN_ROW = ", C++ runtime, lean memory (et_decode --lean-memory)"
CPP_ROWS = (CPP_ROW, CPP_LEAN_ROW)
DECODE_RATIO_TARGET = 5.0  # quantized decode tok/s over eager fp32 decode tok/s, at least
RSS_SHARE_TARGET = 0.60  # peak RSS while decoding over bundle bytes, below
PR_SET_THP_DISABLE = 41  # linux/prctl.h
MADV_NOHUGEPAGE = 15  # asm-generic/mman-common.h


# --- the measurement, shared by both runtimes ----------------------------------------------

def prompt_ids(n: int, *, seed: int = 0) -> list[int]:
    """`n` token ids away from the special tokens at the bottom of the vocabulary."""
    import numpy as np

    return np.random.default_rng(seed).integers(1000, 200_000, n).tolist()


def measure_generation(forward: Callable[[list[int]], Any], reset: Callable[[], None], *, prompt: list[int],
                       steps: int, repeats: int) -> dict[str, Any]:
    """Time prefill and greedy decode `repeats` times; peak RSS of the decode loops only.

    `forward(ids)` feeds ids after what the cache holds and returns logits [len(ids), vocab]
    as numpy; `reset()` empties the cache.
    """
    forward(prompt[:8])  # warm-up: first-run allocations and kernel selection
    forward([prompt[8]])
    reset()
    prefill_s, decode_s, decode_hwm, tokens = [], [], 0, []
    hwm_reset = True
    # clear_refs also resets what getrusage's ru_maxrss reports (both read mm->hiwater_rss),
    # so the whole-life peak is the largest VmHWM seen before each reset.
    life_peak = proc_status().get("VmHWM", 0)
    for _ in range(repeats):
        reset()
        start = time.perf_counter()
        logits = forward(prompt)[-1:].copy()  # what the runner keeps of a prefill (engine.prefill)
        prefill_s.append(time.perf_counter() - start)
        life_peak = max(life_peak, proc_status().get("VmHWM", 0))
        hwm_reset = reset_peak_rss() and hwm_reset
        generated = []
        start = time.perf_counter()
        for _ in range(steps):
            token = int(logits[-1].argmax())
            generated.append(token)
            logits = forward([token])
        decode_s.append(time.perf_counter() - start)
        decode_hwm = max(decode_hwm, proc_status().get("VmHWM", 0))
        tokens = generated
    return {
        "load_average_1min_at_end": os.getloadavg()[0],
        "prefill_tok_s": [len(prompt) / s for s in prefill_s],
        "decode_tok_s": [steps / s for s in decode_s],
        "decode_peak_rss_bytes": decode_hwm if hwm_reset else None,
        "life_peak_rss_bytes": max(life_peak, decode_hwm),
        "status_after_decode": proc_status(),
        "mapped_rss_after_decode": mapped_rss(),
        "tokens": tokens,
    }


# --- children --------------------------------------------------------------------------------

def _disable_thp() -> bool:
    """Ask the kernel not to map this process's memory with huge pages (file mappings included)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0


def _patch_session_options(*, arena: bool, prepacking: bool) -> None:
    """Experiment only: the backend's sessions get these settings (the runner's: arena off,
    prepacking on)."""
    import onnxruntime

    from edgekit.runtimes.backends.onnx_backend import OnnxBackend

    OnnxBackend.memory_arena = arena
    if prepacking:
        return
    base = onnxruntime.SessionOptions

    class PatchedOptions(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.add_session_config_entry("session.disable_prepacking", "1")

    onnxruntime.SessionOptions = PatchedOptions


def child_table_probe(args: argparse.Namespace) -> None:
    """How many bytes of the mmapped embedding tables become resident per random token looked up.

    Modes: `default`; `prctl` (PR_SET_THP_DISABLE before anything is mapped); `madvise`
    (MADV_NOHUGEPAGE on the .data mappings after session creation).
    """
    import ctypes

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    applied = args.probe_mode == "default"
    if args.probe_mode == "prctl":
        applied = _disable_thp()
    from edgekit import onnx_layout as L
    from edgekit.manifest import METHOD_TOKEN_EMBEDDING
    from edgekit.runtimes.engine import Engine

    engine = Engine.open(args.bundle, threads=args.threads)
    session = engine.backend._session(METHOD_TOKEN_EMBEDDING)
    if args.probe_mode == "madvise":
        applied = True
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".onnx.data"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                applied = libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_NOHUGEPAGE) == 0 and applied
    before = mapped_rss().get("embedding.onnx.data", 0)
    ids = np.asarray([prompt_ids(args.prompt_tokens, seed=1)], np.int64)
    empty = np.zeros((0, engine.backend.hidden_size), np.float32)
    session.run(None, {L.INPUT_IDS: ids, L.IMAGE_FEATURES: empty, L.AUDIO_FEATURES: empty})
    pmd = sum(int(line.split()[1]) * 1024 for line in Path("/proc/self/smaps").read_text().splitlines()
              if line.startswith("FilePmdMapped:"))
    emit_result({"mode": args.probe_mode, "applied": applied, "tokens": int(ids.size),
                 "distinct_tokens": len(set(ids[0].tolist())), "resident_before": before,
                 "resident_after": mapped_rss().get("embedding.onnx.data", 0), "file_pmd_mapped": pmd,
                 "file_bytes": (Path(args.bundle) / "embedding.onnx.data").stat().st_size})


def child_bundle(args: argparse.Namespace) -> None:
    """Any bundle through edgekit.runtimes (ONNX: onnxruntime sessions; ExecuTorch: the program)."""
    if args.arena or args.no_prepack:
        _patch_session_options(arena=args.arena, prepacking=not args.no_prepack)
    if args.keep_pages:  # experiment: leave the pages prepacking read resident (the runner gives them back)
        from edgekit.runtimes.backends import onnx_backend

        onnx_backend.release_file_pages = lambda path: 0
    if args.allow_mlock:  # experiment: the bindings' mlock as root (the runner loads without it)
        import contextlib

        from edgekit.runtimes.backends import executorch_backend

        executorch_backend.mlock_disabled = contextlib.nullcontext
    if args.import_compiler:  # experiment: executorch.exir loaded, as ExecuTorch's own runtime import does
        import executorch.exir  # noqa: F401
    if args.keep_heap:  # experiment: no malloc_trim after a prefill (the runner trims)
        from edgekit.runtimes.backends import executorch_backend, onnx_backend

        onnx_backend.release_free_heap = executorch_backend.release_free_heap = lambda: False
    import numpy as np

    from edgekit.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING
    from edgekit.compute_shapes import PREFILL_CHUNK
    from edgekit.runtimes.engine import Engine

    before = proc_status()
    start = time.perf_counter()
    engine = Engine.open(args.bundle, threads=args.threads)
    backend = engine.backend
    fmt = backend.manifest.format
    # Sessions / methods are created lazily on first use; create the two text ones here so
    # load time is their creation. ExecuTorch's Module loads a method on its first run, so
    # there load time includes one 1-token forward.
    if fmt == "onnx":
        backend._session(METHOD_TOKEN_EMBEDDING)
        backend._session(METHOD_TEXT_DECODER)
    else:
        backend.forward(np.array([2], np.int64))
        backend.reset()
    load_s = time.perf_counter() - start
    after_load, mapped_after_load = proc_status(), mapped_rss()
    def forward(ids: list[int]):
        # in the chunks the engine feeds a prompt in (edgekit.runtimes.engine.feed_prompt)
        chunk = min(PREFILL_CHUNK, backend.max_prefill_tokens or PREFILL_CHUNK)
        for start in range(0, len(ids), chunk):
            logits = backend.forward(np.asarray(ids[start:start + chunk], np.int64))
        return logits

    result = measure_generation(forward, backend.reset,
                                prompt=prompt_ids(args.prompt_tokens), steps=args.decode_steps, repeats=args.repeats)
    emit_result({"runtime": fmt, "load_s": load_s, "status_before_load": before, "status_after_load": after_load,
                 "mapped_rss_after_load": mapped_after_load,
                 "arena_enabled": bool(args.arena), "pages_kept": bool(args.keep_pages),
                 "heap_kept": bool(args.keep_heap), "compiler_imported": bool(args.import_compiler),
                 "mlock_allowed": bool(args.allow_mlock),
                 "prepacking_disabled": bool(args.no_prepack),
                 "torch_imported": "torch" in sys.modules, **result})


def child_eager(args: argparse.Namespace) -> None:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    before = proc_status()
    start = time.perf_counter()
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        str(args.checkpoint), dtype=torch.float32, local_files_only=True).eval()
    load_s = time.perf_counter() - start
    after_load = proc_status()
    state: dict[str, Any] = {"cache": None}

    def forward(ids: list[int]):
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], dtype=torch.long), past_key_values=state["cache"],
                        use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[0].numpy()

    def reset() -> None:
        state["cache"] = None

    result = measure_generation(forward, reset, prompt=prompt_ids(args.prompt_tokens), steps=args.decode_steps,
                                repeats=args.repeats)
    emit_result({"runtime": "eager", "load_s": load_s, "status_before_load": before, "status_after_load": after_load,
                 "cache_type": type(state["cache"]).__name__, "torch_threads": torch.get_num_threads(), **result})


def child_command(role: str, args: argparse.Namespace, **extra: Any) -> list[str]:
    cmd = [PYTHON, str(Path(__file__).resolve()), "--child", role, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--decode-steps", str(args.decode_steps),
           "--repeats", str(args.repeats)]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value not in (None, False):
            cmd += [flag, str(value)]
    return cmd


def run_bundle_child(args: argparse.Namespace, bundle: Path, *, repeats: int | None = None,
                     decode_steps: int | None = None, **flags: Any) -> dict[str, Any]:
    short = argparse.Namespace(**{**vars(args), "repeats": repeats or args.repeats,
                                  "decode_steps": decode_steps or args.decode_steps})
    drop_from_page_cache(bundle)
    result, _ = run_child([*without_mlock_privilege(), *child_command("bundle", short, bundle=bundle, **flags)])
    result["decode_steps"] = short.decode_steps
    return result


# --- parent -----------------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """Median, then (min-max) when there is more than one value."""
    return fmt.format(_median(xs)) + (f" ({fmt.format(min(xs))}-{fmt.format(max(xs))})" if len(xs) > 1 else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="checkpoints and bundles (reused)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the e2b-shape checkpoint")
    parser.add_argument("--bundles", default=DEFAULT_BUNDLES, help="comma list of FORMAT:RECIPE to export and run")
    parser.add_argument("--modalities", default="text",
                        help="modalities exported into the bundles (bundle size counts only these)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="prefill+decode rounds per runtime (median shown)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--skip-eager", action="store_true", help="leave out the transformers baseline")
    parser.add_argument("--investigate", action="store_true",
                        help="also run the int4 bundle with the ORT arena on, with its prepacked weights' pages "
                        "kept, with prepacking off, and probe how much of the mmapped embedding tables random "
                        "lookups make resident")
    parser.add_argument("--fresh", action="store_true", help="re-export bundles even if they exist")
    parser.add_argument("--no-cpp", action="store_true",
                        help="leave out the ExecuTorch C++ runtime rows (bench/et_decode, needs cmake and a C++ compiler)")
    # children
    parser.add_argument("--child", choices=("bundle", "eager", "table-probe"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-mode", choices=("default", "prctl", "madvise"), default="default",
                        help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--arena", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-pages", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-heap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--import-compiler", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allow-mlock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-prepack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "bundle":
        return child_bundle(args)
    if args.child == "eager":
        return child_eager(args)
    if args.child == "table-probe":
        return child_table_probe(args)

    print(header(f"ONNX and ExecuTorch bundles vs eager transformers (e2b-shape, {args.layers} layers)",
                 packages=("torch", "transformers", "onnxruntime", "onnx", "executorch", "torchao")))
    checkpoint, how = ensure_checkpoint(args.workdir, layers=args.layers)
    print(f"- checkpoint: `{checkpoint}` ({how})")
    print(f"- workload: {args.prompt_tokens}-token random prompt, then {args.decode_steps} greedy decode steps; "
          f"{args.threads} threads; {args.repeats} rounds per runtime, median (min-max); bundles hold "
          f"`{args.modalities}` only\n")
    wanted = [tuple(item.strip().split(":", 1)) for item in args.bundles.split(",") if item.strip()]
    bundles, records = {}, {}
    for fmt, quant in wanted:
        name = f"{fmt} {quant}"
        device = DEVICES[fmt]
        bundle = args.workdir / f"{checkpoint.name}-{device}-{quant}-{args.modalities.replace(',', '+')}.edgekit"
        record, measured = ensure_bundle(checkpoint, device=device, quant=quant, modalities=args.modalities,
                                         bundle=bundle, fresh=args.fresh, log=args.workdir / f"{bundle.name}.log")
        if record is None:
            raise SystemExit(f"export {name} failed: {measured.killed_reason or measured.output[-3000:]}")
        bundles[name], records[name] = bundle, record

    results: dict[str, dict[str, Any]] = {}
    if not args.skip_eager:
        result, _ = run_child(child_command("eager", args, checkpoint=checkpoint))
        results["eager fp32 (transformers)"] = result
    for name, bundle in bundles.items():
        results[name] = run_bundle_child(args, bundle)
    if not args.no_cpp and any(name.startswith("executorch") for name in bundles):
        binary = et_cpp.build(args.workdir / "et_decode-build")
        for name, bundle in bundles.items():
            if name.startswith("executorch"):
                for suffix in CPP_ROWS:
                    drop_from_page_cache(bundle)
                    results[name + suffix] = et_cpp.run_bundle(
                        binary, bundle, prompt_ids(args.prompt_tokens), steps=args.decode_steps,
                        repeats=args.repeats, prefix=without_mlock_privilege(), lean_memory=suffix == CPP_LEAN_ROW)
    probes = []
    if args.investigate and "onnx int4" in bundles:
        int4 = bundles["onnx int4"]
        results["onnx int4, ORT arena on (experiment; the runner turns it off)"] = run_bundle_child(
            args, int4, arena=True)
        results["onnx int4, prepacked weights' mapped pages kept (experiment)"] = (
            run_bundle_child(args, int4, keep_pages=True))
        # Without prepacking MatMulNBits decodes ~40x slower: one short round is enough to show it.
        results["onnx int4, prepacking off (experiment, 1 round of 16 steps)"] = run_bundle_child(
            args, int4, repeats=1, decode_steps=16, no_prepack=True)
        for mode in ("default", "prctl", "madvise"):
            drop_from_page_cache(int4)
            probes.append(run_child(child_command("table-probe", args, bundle=int4, probe_mode=mode))[0])
    raw = args.workdir / f"bench_runtimes-{checkpoint.name}.json"
    raw.write_text(json.dumps({"results": results, "probes": probes}, indent=1) + "\n")

    print(_export_table(records))
    print()
    print(_runtime_table(results, bundles))
    print()
    print(_memory_table(results, bundles))
    print()
    print(_ratios(results, bundles))
    if probes:
        print()
        print(_probe_table(probes))
    print(f"\nraw results: `{raw}`")


def _export_table(records) -> str:
    rows = []
    for name, r in records.items():
        rows.append([name, f"{r.seconds:.0f} s" + (" (earlier run)" if r.reused else ""), mib(r.peak_rss_bytes),
                     f"{gb(r.bundle_bytes)} ({r.bundle_bytes:,} B)", f"`{r.command}`"])
    return "Export (`edgekit export` in a child; peak RSS = the child's ru_maxrss)\n\n" + table(
        ["bundle", "export time", "export peak RSS", "bundle size on disk", "command"], rows)


def _without_cpp_suffix(name: str) -> str:
    for suffix in CPP_ROWS:
        name = name.removesuffix(suffix)
    return name


def _bundle_bytes(name: str, bundles: dict[str, Path]) -> int | None:
    from common import dir_bytes

    # the longest name that prefixes it: "onnx int4-head128 ..." is not "onnx int4"
    matches = [bundle_name for bundle_name in bundles if name.startswith(bundle_name)]
    return dir_bytes(bundles[max(matches, key=len)]) if matches else None


def _runtime_table(results, bundles) -> str:
    rows = []
    for name, r in results.items():
        size = _bundle_bytes(name, bundles)
        hwm = r["decode_peak_rss_bytes"]
        share = f"{hwm / size:.0%}" if size and hwm else "n/a"
        rows.append([name, f"{r['load_s']:.2f} s", spread(r["prefill_tok_s"]), spread(r["decode_tok_s"]),
                     mib(hwm), mib(r["life_peak_rss_bytes"]), gb(size) if size else "-", share,
                     f"{r['load_average_1min_at_end']:.1f}"])
    return "Runtimes (each in its own child process)\n\n" + table(
        ["runtime", "load", "prefill tok/s", "decode tok/s", "peak RSS while decoding", "peak RSS, whole child (load + prefill too)",
         "bundle", "decode peak RSS / bundle", "load avg (1 min) at end"], rows)


def _memory_table(results, bundles) -> str:
    rows = []
    for name, r in results.items():
        after, load = r["status_after_decode"], r["status_after_load"]
        mapped = r.get("mapped_rss_after_decode", {})
        data = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in sorted(mapped.items()) if k.endswith((".data", ".pte"))) or "-"
        mapped_load = r.get("mapped_rss_after_load", {})
        data_load = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in sorted(mapped_load.items())
                              if k.endswith((".data", ".pte"))) or "-"
        rows.append([name, mib(r["status_before_load"].get("RssAnon")), mib(load.get("RssAnon")),
                     mib(load.get("RssFile")), data_load, mib(after.get("RssAnon")),
                     mib(after.get("RssFile")), data])
    return ("Where the resident memory is (from /proc/self/status and /proc/self/smaps; "
            "'.data mapped' = resident pages of the mmapped external-data files, MiB)\n\n" + table(
                ["runtime", "anon before load (imports)", "anon after load", "file after load", ".data mapped after load", "anon after decode",
                 "file after decode", ".data mapped after decode"], rows))


def _probe_table(probes) -> str:
    rows = []
    for p in probes:
        grown = p["resident_after"] - p["resident_before"]
        rows.append([{"default": "default", "prctl": "PR_SET_THP_DISABLE", "madvise": "MADV_NOHUGEPAGE on .data"}[
                         p["mode"]] + ("" if p["applied"] else " (call failed)"),
                     f"{p['tokens']} ({p['distinct_tokens']} distinct)", mib(p["resident_before"]), mib(p["resident_after"]),
                     f"{grown / max(p['distinct_tokens'], 1) / 2**20:.2f} MiB", mib(p["file_pmd_mapped"]),
                     mib(p["file_bytes"])])
    return ("Embedding tables (embedding.onnx.data, mmapped by onnxruntime): resident pages after one lookup of random "
            "token ids, int4 bundle\n\n" + table(["mode", "tokens looked up", "resident before", "resident after",
                                                    "per distinct token", "FilePmdMapped", "file size"], rows))


def _ratios(results, bundles) -> str:
    lines = ["Ratios vs targets (same run)\n"]
    eager = results.get("eager fp32 (transformers)")
    rows = []
    for name, r in results.items():
        if name == "eager fp32 (transformers)":
            continue
        if eager:
            ratio = _median(r["decode_tok_s"]) / _median(eager["decode_tok_s"])
            quantized = _without_cpp_suffix(name).startswith(QUANTIZED_PREFIXES)
            target = f">= {DECODE_RATIO_TARGET:.0f}x" if quantized else "-"
            met = verdict(ratio >= DECODE_RATIO_TARGET) if quantized else ""
            rows.append([f"{name} decode / eager fp32 decode", f"{ratio:.2f}x", target, met])
            agree = sum(a == b for a, b in zip(r["tokens"], eager["tokens"]))
            compared = min(len(r["tokens"]), len(eager["tokens"]))
            rows.append([f"{name} greedy tokens equal to eager's", f"{agree}/{compared}", "-", ""])
        size = _bundle_bytes(name, bundles)
        hwm = r["decode_peak_rss_bytes"]
        if size and hwm:
            share = hwm / size
            rows.append([f"{name} peak RSS while decoding / bundle size", f"{share:.0%}",
                         f"< {RSS_SHARE_TARGET:.0%}", verdict(share < RSS_SHARE_TARGET)])
            anon = r["status_after_decode"].get("RssAnon", 0)
            rows.append([f"{name} anonymous RSS after decode / bundle size", f"{anon / size:.0%}", "-", ""])
            before = r["status_before_load"].get("VmRSS", 0)
            if name.endswith(CPP_ROWS) and before:
                # et_decode's resident memory before it loads the program: the libraries only, among
                # them the wheel's torch-linked LLM custom-ops library (an app's build compiles those
                # kernels in without torch, ExecuTorch's Android / Apple presets)
                rows.append([f"{name} (peak RSS while decoding - {before / 2**20:,.0f} MiB resident before load) "
                             "/ bundle size", f"{(hwm - before) / size:.0%}", f"< {RSS_SHARE_TARGET:.0%}",
                             verdict((hwm - before) / size < RSS_SHARE_TARGET)])
    lines.append(table(["ratio", "measured", "target", ""], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
