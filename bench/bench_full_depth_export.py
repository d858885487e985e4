"""Full-depth `e2b-shape` (5.1 B random weights) exported with a profile's recipe, then decoded.

    disk check (refuse below --min-free-disk-gb) ─► `edgekit make-checkpoint e2b-shape` (~10 GB bf16)
    ─► `edgekit export --device pi5-8gb --quant int4` (ONNX; or --device android-flagship
       --quant 8da4w-emb4 for ExecuTorch) in a watched child:
         every 0.5 s: MemAvailable, the child tree's RSS, the files it has written so far;
         killed when MemAvailable < --min-free-mem-gb or past --timeout (the machine is shared)
    ─► bundle size ─► decode in its own child (bench_runtimes.py --child bundle): tok/s, peak RSS
    ─► ExecuTorch bundles: the same decode through ExecuTorch's C++ runtime (bench/et_decode)
    [on failure, --fit-layers 4,8: the same recipe at two cut depths (text graphs by default),
     to show how export memory grows per layer — the full-depth figure is an extrapolation]

Targets (issues): bundle <= 2.5 GB; decode peak RSS <= 1.3 GB; export peak RSS <= 16 GiB.
Run it in the background with a log, e.g.
    timeout 2400 .venv/bin/python bench/bench_full_depth_export.py > full-depth.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_WORKDIR, GIB, checkpoint_dir, dir_bytes, disk_free_bytes,  # noqa: E402
                    drop_from_page_cache, ensure_bundle, ensure_checkpoint, gb, header, mib, table, verdict,
                    without_mlock_privilege)

BUNDLE_TARGET_BYTES = 2.5e9
DECODE_RSS_TARGET_BYTES = 1.3e9
EXPORT_RSS_TARGET_BYTES = 16 * GIB
FULL_DEPTH_LAYERS = 35  # released E2B (docs/architecture.md)


class ProgressLog:
    """Prints a line every `every_s` seconds while a child runs: memory and the newest files."""

    def __init__(self, workdir: Path, bundle: Path, *, every_s: float = 10.0) -> None:
        self.workdir, self.bundle, self.every_s = workdir, bundle, every_s
        self.last = -every_s
        self.peak_tree = 0
        self.last_sample: dict[str, Any] = {}
        self.last_files = ""

    def files(self) -> str:
        """What the export has written so far: its scratch (raw graphs) and temp bundle dirs."""
        found = []
        for d in sorted(self.workdir.glob(f".{self.bundle.name}.*")):
            for f in sorted(d.iterdir(), key=lambda p: p.stat().st_mtime):
                found.append(f"{d.name.split('.')[-1][:7]}/{f.name} {f.stat().st_size / 1e9:.2f} GB")
        return "; ".join(found) or "no output files yet"

    def __call__(self, sample: dict[str, Any]) -> None:
        self.peak_tree = max(self.peak_tree, sample["tree_rss_bytes"])
        self.last_sample = sample
        if sample["t_s"] - self.last >= self.every_s:
            self.last = sample["t_s"]
            try:
                self.last_files = self.files()
            except OSError:
                pass
            print(f"  [{sample['t_s']:6.0f} s] RSS {sample['tree_rss_bytes'] / GIB:5.2f} GiB "
                  f"(anon {sample.get('tree_anon_bytes', 0) / GIB:5.2f}), "
                  f"MemAvailable {sample['available_bytes'] / GIB:5.2f} GiB | {self.last_files}", flush=True)


def export_watched(args: argparse.Namespace, checkpoint: Path, bundle: Path, *, timeout_s: float,
                   modalities: str | None) -> tuple[Any, Any, ProgressLog]:
    progress = ProgressLog(args.workdir, bundle)
    record, measured = ensure_bundle(checkpoint, device=args.device, quant=args.quant, modalities=modalities, bundle=bundle,
                                     fresh=args.fresh, log=args.workdir / f"{bundle.name}.log", timeout_s=timeout_s,
                                     min_free_bytes=int(args.min_free_mem_gb * GIB), on_sample=progress,
                                     extra_args=["--external-weights"] if getattr(args, "external_weights", False) else [])
    return record, measured, progress


def _failure_report(measured, progress: ProgressLog, log: Path) -> list[str]:
    tail = [line for line in measured.output.splitlines() if line.strip()][-6:]
    lines = [f"- export FAILED after {measured.wall_s:.0f} s: "
             f"{measured.killed_reason or f'exit status {measured.returncode}'}",
             f"- export child's peak RSS (ru_maxrss via wait4): {mib(measured.peak_rss_bytes)}; "
             f"largest tree RSS sampled: {mib(progress.peak_tree)}",
             f"- last sample: {json.dumps(progress.last_sample)}",
             f"- files written by then: {progress.last_files or progress.files()}",
             f"- step: {_step_from_files(progress.last_files)}",
             f"- log: `{log}`; its last lines:", "", "```", *tail, "```"]
    return lines


def _step_from_files(files: str) -> str:
    """Where the exporter was, from what it had written (export_onnx writes raw graphs first;
    export_executorch writes only model.pte, at the end)."""
    if not files or files == "no output files yet":
        # Both exporters load the checkpoint (bf16, lazy_upcast) before they write anything.
        return "before the first graph was traced: loading the checkpoint (load_in_checkpoint_dtype)"
    last = files.split("; ")[-1]
    if last.startswith("raw"):
        return f"tracing or quantizing a graph (newest raw file: {last})"
    return f"quantizing / saving into the bundle (newest bundle file: {last})"


def fit_layers(args: argparse.Namespace, layer_counts: list[int], deadline: float) -> list[list[str]]:
    """Export cut-depth checkpoints with the same recipe; one row per depth (all measured)."""
    rows = []
    for layers in layer_counts:
        if time.time() > deadline - 60:
            rows.append([str(layers), "skipped: out of time", "", "", ""])
            continue
        checkpoint, _ = ensure_checkpoint(args.workdir, layers=layers)
        suffix = (args.fit_modalities or "all").replace(",", "+")
        bundle = args.workdir / f"{checkpoint.name}-{args.device}-{args.quant}-{suffix}.edgekit"
        record, measured, progress = export_watched(args, checkpoint, bundle, timeout_s=deadline - time.time(),
                                                    modalities=args.fit_modalities)
        params = _param_count(checkpoint)
        if record is None:
            rows.append([str(layers), f"{params / 1e9:.3f} B", "FAILED: " + (measured.killed_reason or "error"),
                         mib(measured.peak_rss_bytes), ""])
        else:
            rows.append([str(layers), f"{params / 1e9:.3f} B",
                         f"{record.seconds:.0f} s" + (" (earlier run)" if record.reused else ""),
                         mib(record.peak_rss_bytes), gb(record.bundle_bytes)])
    return rows


def _param_count(checkpoint: Path) -> int:
    from edgekit.checkpoint import read_safetensors_header, weight_files

    total = 0
    for f in weight_files(checkpoint):
        for _, (_, shape) in read_safetensors_header(f).tensors.items():
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def _extrapolate(rows: list[list[str]], full_params: int) -> str:
    """Straight line through the measured (parameters, export peak RSS) points, at full depth."""
    points = []
    for layers, params, _, peak, _ in rows:
        if peak.endswith("MiB") and params.endswith(" B"):
            points.append((float(params[:-2]) * 1e9, float(peak[:-4].replace(",", "")) * 2**20))
    if len(points) < 2:
        return "not enough measured depths to extrapolate"
    (x0, y0), (x1, y1) = points[0], points[-1]
    slope = (y1 - y0) / (x1 - x0)
    at_full = y0 + slope * (full_params - x0)
    text = (f"straight line through the measured points: {slope:.2f} bytes of export peak RSS per parameter "
            f"-> {at_full / GIB:.1f} GiB at {full_params / 1e9:.2f} B parameters (an extrapolation, not a measurement)")
    sizes = [(int(r[0]), float(r[4].split()[0]) * 1e9) for r in rows if r[4].endswith(" GB")]
    if len(sizes) >= 2:
        (l0, b0), (l1, b1) = sizes[0], sizes[-1]
        per_layer = (b1 - b0) / (l1 - l0)
        text += (f"\nbundle: {per_layer / 1e9:.3f} GB per decoder layer -> "
                 f"{(b0 + per_layer * (FULL_DEPTH_LAYERS - l0)) / 1e9:.2f} GB for the exported graphs at "
                 f"{FULL_DEPTH_LAYERS} layers (extrapolated)")
    return text


def _decode_row(step: str, decode: dict[str, Any]) -> list[str]:
    """A decode measurement (a bench_runtimes child's or et_decode's) as a table row."""
    hwm = decode["decode_peak_rss_bytes"]
    # et_decode's libraries before the program loads (the wheel's torch-linked LLM custom-ops library)
    before = decode["status_before_load"].get("VmRSS", 0) if decode["runtime"] == "executorch-cpp" else 0
    return [step, "ok", f"{decode['load_s']:.1f} s load",
            f"{mib(hwm)} (anon {mib(decode['status_after_decode'].get('RssAnon'))}"
            + (f"; {mib(before)} resident before load" if before else "") + ")",
            f"{sorted(decode['decode_tok_s'])[len(decode['decode_tok_s']) // 2]:.2f} tok/s",
            f"<= {gb(DECODE_RSS_TARGET_BYTES)} RSS", verdict(hwm is not None and hwm <= DECODE_RSS_TARGET_BYTES)]


def _cpp_decode(args: argparse.Namespace, bundle: Path, *, lean_memory: bool = False) -> dict[str, Any]:
    """The same decode through ExecuTorch's C++ runtime (bench/et_decode): what an app holds;
    `lean_memory`: with et_decode --lean-memory (planned memory resident as written, tables
    random-access)."""
    import et_cpp
    from bench_runtimes import prompt_ids

    drop_from_page_cache(bundle)
    return et_cpp.run_bundle(et_cpp.build(args.workdir / "et_decode-build"), bundle, prompt_ids(args.prompt_tokens),
                             steps=args.decode_steps, repeats=args.repeats, prefix=without_mlock_privilege(),
                             lean_memory=lean_memory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="checkpoint and bundle (reused)")
    parser.add_argument("--device", default="pi5-8gb", help="profile (pi5-8gb: ONNX; android-flagship: ExecuTorch)")
    parser.add_argument("--quant", default="int4", help="recipe (pi5-8gb's is int4, android-flagship's 8da4w-emb4)")
    parser.add_argument("--modalities", default=None, help="default: the profile's (text,audio,vision)")
    parser.add_argument("--min-free-disk-gb", type=float, default=40.0, help="refuse to start below this")
    parser.add_argument("--min-free-mem-gb", type=float, default=4.0,
                        help="kill the export when MemAvailable drops below this (GiB)")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds for the whole script")
    parser.add_argument("--fit-layers", default="4,8",
                        help="if the full export fails, export these cut depths to show the trend ('' = off)")
    parser.add_argument("--fit-modalities", default="text",
                        help="modalities of the cut-depth exports (text: the audio graph's export ran > 12 min "
                        "at real width on 2 cores; the text graphs hold all the per-layer growth)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="re-export even if the bundle exists")
    parser.add_argument("--no-cpp", action="store_true",
                        help="ExecuTorch bundles: leave out the decode through the C++ runtime (bench/et_decode)")
    parser.add_argument("--external-weights", action="store_true",
                        help="ExecuTorch: export with --external-weights (weights in model.ptd)")
    args = parser.parse_args(argv)
    deadline = time.time() + args.timeout
    args.workdir.mkdir(parents=True, exist_ok=True)

    print(header(f"Full-depth e2b-shape export for {args.device}, recipe {args.quant}",
                 packages=("torch", "transformers", "onnxruntime", "onnx", "executorch", "torchao")), flush=True)
    free = disk_free_bytes(args.workdir)
    print(f"- free disk at `{args.workdir}`: {gb(free)}", flush=True)
    if free < args.min_free_disk_gb * 1e9 and not (checkpoint_dir(args.workdir, None) / "config.json").is_file():
        raise SystemExit(f"refusing: {gb(free)} free at {args.workdir}, need {args.min_free_disk_gb:.0f} GB "
                         "(~10 GB checkpoint, raw fp32 graphs, the bundle)")

    started = time.perf_counter()
    checkpoint, how = ensure_checkpoint(args.workdir, layers=None, log=args.workdir / "make-checkpoint-full.log")
    print(f"- checkpoint: `{checkpoint}` ({how}; {gb(dir_bytes(checkpoint))} on disk, "
          f"{_param_count(checkpoint) / 1e9:.3f} B parameters)", flush=True)
    print(f"- export: watched every 0.5 s, killed below {args.min_free_mem_gb:.0f} GiB MemAvailable or at the "
          f"deadline\n", flush=True)
    suffix = (args.modalities or "all").replace(",", "+") + ("-ptd" if args.external_weights else "")
    bundle = args.workdir / f"{checkpoint.name}-{args.device}-{args.quant}-{suffix}.edgekit"
    record, measured, progress = export_watched(args, checkpoint, bundle, timeout_s=deadline - time.time(),
                                                modalities=args.modalities)

    rows = []
    if record is None:
        print("\n".join(_failure_report(measured, progress, args.workdir / f"{bundle.name}.log")), flush=True)
        rows.append(["export", "FAILED", f"{measured.wall_s:.0f} s", mib(measured.peak_rss_bytes), "-",
                     f"<= {EXPORT_RSS_TARGET_BYTES / GIB:.0f} GiB", "not reached"])
    else:
        rows.append(["export", "ok", f"{record.seconds:.0f} s" + (" (earlier run)" if record.reused else ""),
                     mib(record.peak_rss_bytes), "-", f"<= {EXPORT_RSS_TARGET_BYTES / GIB:.0f} GiB",
                     verdict(record.peak_rss_bytes <= EXPORT_RSS_TARGET_BYTES)])
        rows.append(["bundle size", "", "", "", gb(record.bundle_bytes), f"<= {gb(BUNDLE_TARGET_BYTES)}",
                     verdict(record.bundle_bytes <= BUNDLE_TARGET_BYTES)])
        from bench_runtimes import run_bundle_child

        rows.append(_decode_row("decode", run_bundle_child(args, bundle)))
        if (bundle / "model.pte").is_file() and not args.no_cpp:
            rows.append(_decode_row("decode, ExecuTorch C++ runtime (et_decode)", _cpp_decode(args, bundle)))
            rows.append(_decode_row("decode, ExecuTorch C++ runtime, lean memory (et_decode --lean-memory)",
                                    _cpp_decode(args, bundle, lean_memory=True)))
    print()
    print(table(["step", "result", "time", "peak RSS", "size / speed", "target", ""], rows), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)

    layer_counts = [int(x) for x in args.fit_layers.split(",") if x.strip()]
    if record is None and layer_counts:
        print(f"\nThe same recipe at cut depths, modalities `{args.fit_modalities or 'all'}` (a bundle already in "
              "--workdir is reused with the export record of the run that made it)\n", flush=True)
        fit_rows = fit_layers(args, layer_counts, deadline)
        print(table(["layers", "parameters", "export time", "export peak RSS", "bundle"], fit_rows))
        print("\n" + _extrapolate(fit_rows, _param_count(checkpoint)), flush=True)


if __name__ == "__main__":
    main()
