"""edgekit's bundles against llama.cpp on the same random-weight checkpoint, side by side (issue 23).

    `edgekit make-checkpoint PRESET --layers N`
      ─► llama.cpp's convert_hf_to_gguf.py (BF16; it keeps the text model only)
            ─► llama-quantize Q4_0, Q4_K_M
      ─► `edgekit export --modalities text`: ONNX at pi5-8gb's default recipe, int4-ple2 (size first)
            and int4-b128; ExecuTorch at android-flagship's default recipe and 8da4w-g128
    then R rounds, each running every row once (interleaved, so machine noise hits all alike),
    each run a child process measured cold (its files evicted from the page cache first):
      llama.cpp: llama-bench -p P -n D -r 1 -t T (pp and tg t/s; peak RSS = wait4's ru_maxrss),
                 with the default OMP_WAIT_POLICY and with OMP_WAIT_POLICY=passive
      ONNX:      bench_runtimes.py's bundle child (the runner's backend), 1 round per child
      ExecuTorch: bench/et_decode, ExecuTorch's C++ runtime (bench_runtimes.py's C++ rows)
    and the roofline: this machine's read bandwidth with T threads over each row's weight bytes
    read per decode step.

llama.cpp comes from the package index: the llama-cpp-python source distribution carries
llama.cpp's sources (vendor/llama.cpp, convert script and gguf-py included). It is downloaded,
unpacked and built (llama-bench, llama-quantize; CPU, GGML_NATIVE, Release) once into
--peers-cache and reused. Peak RSS is each child's whole life (load, prefill and decode), the
only peak llama-bench gives.

Usage: .venv/bin/python bench/bench_peers.py --preset e2b-shape --layers 4 [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import et_cpp  # noqa: E402
from bench_runtimes import DEVICES, prompt_ids, run_bundle_child, spread  # noqa: E402
from common import (DEFAULT_WORKDIR, GIB, MIB, PYTHON, ExportRecord, checkpoint_dir, dir_bytes,  # noqa: E402
                    drop_from_page_cache, emit_result, ensure_bundle, ensure_checkpoint, header, record_path,
                    run_child, run_measured, table, without_mlock_privilege)

LLAMA_CPP_PYTHON = "0.3.36"  # its llama.cpp (0c1e57098) knows gemma4
DEFAULT_CACHE = Path.home() / ".cache" / "edgekit-peers"
LLAMA_TOOLS = ("llama-bench", "llama-quantize")
GGUF_TYPES = ("Q4_0", "Q4_K_M")
# Recipes beside each profile's default: ONNX's size-first and block-128 recipes, ExecuTorch's group 128.
EXTRA_RECIPES = {"onnx": ("int4-ple2", "int4-b128"), "executorch": ("8da4w-g128",)}
LLAMA = "llama.cpp"
LLAMA_PASSIVE = "llama.cpp, OMP_WAIT_POLICY=passive"
BASELINE = (LLAMA, "Q4_0")  # ratios are to this row
MIN_FREE_MEM = 4 * GIB  # exports are killed below this MemAvailable (the machine is shared)
BANDWIDTH_BYTES = 1 * GIB  # far past any cache


# --- llama.cpp from the package index ---------------------------------------------------------

@dataclass
class LlamaCpp:
    """A built llama.cpp: its sources (convert script, gguf-py) and the tools used here."""

    package_version: str
    commit: str  # llama.cpp's, from llama-cpp-python's CHANGELOG (the sdist has no .git)
    ggml_version: str
    gguf_py_version: str
    source: Path
    bin_dir: Path
    knows_gemma4: bool

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    def describe(self) -> str:
        return (f"llama.cpp {self.commit} (llama-cpp-python {self.package_version} sdist, ggml {self.ggml_version}, "
                f"gguf-py {self.gguf_py_version}); knows gemma4: {'yes' if self.knows_gemma4 else 'NO'}; "
                f"built CPU-only with GGML_NATIVE in `{self.bin_dir}`")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_llama_cpp(cache: Path, version: str) -> LlamaCpp:
    """Download, unpack and build llama.cpp from llama-cpp-python's sdist, each step once."""
    cache.mkdir(parents=True, exist_ok=True)
    package = cache / f"llama_cpp_python-{version}"
    if not (package / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        sdist = cache / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            _say(f"downloading the llama-cpp-python {version} sdist into {cache}")
            done = run_measured([PYTHON, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary",
                                 ":all:", "--no-deps", "-d", cache])
            if not done.ok or not sdist.is_file():
                raise SystemExit(f"pip download llama-cpp-python=={version} failed:\n{done.output[-2000:]}")
        with tarfile.open(sdist) as archive:
            archive.extractall(cache, filter="data")
    source = package / "vendor" / "llama.cpp"
    llama = LlamaCpp(package_version=version, commit=_llama_commit(package, version),
                     ggml_version=_ggml_version(source),
                     gguf_py_version=_toml_version(source / "gguf-py" / "pyproject.toml"), source=source,
                     bin_dir=cache / f"build-{version}" / "bin", knows_gemma4=_knows_gemma4(source))
    if not llama.knows_gemma4:
        raise SystemExit(f"llama.cpp in llama-cpp-python {version} does not know gemma4; pass a newer "
                         "--llama-cpp-python")
    if not all(llama.tool(name).is_file() for name in LLAMA_TOOLS):
        _build(source, llama.bin_dir.parent, commit=llama.commit)
    return llama


def _build(source: Path, build_dir: Path, *, commit: str) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"building llama.cpp needs {tool} on PATH")
    # Only what llama-bench and llama-quantize link: no server (its UI would be fetched), no curl/SSL.
    configure = ["cmake", "-S", source, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
                 f"-DLLAMA_BUILD_COMMIT={commit}"]
    compile_ = ["cmake", "--build", build_dir, "--target", *LLAMA_TOOLS, "-j2"]
    for cmd, log in ((configure, "cmake-configure.log"), (compile_, "cmake-build.log")):
        _say(f"llama.cpp: {' '.join(map(str, cmd[:3]))} ... (log: {build_dir.parent / log}; ~25 min on 2 busy cores)")
        done = run_measured(cmd, log=build_dir.parent / log)
        if not done.ok:
            raise SystemExit(f"llama.cpp build failed ({' '.join(map(str, cmd[:2]))}):\n{done.output[-3000:]}")


def _llama_commit(package: Path, version: str) -> str:
    """The llama.cpp commit llama-cpp-python's CHANGELOG names for `version`."""
    changelog = (package / "CHANGELOG.md").read_text(errors="replace")
    section = changelog.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else "unknown"


def _ggml_version(source: Path) -> str:
    text = (source / "ggml" / "CMakeLists.txt").read_text()
    parts = [re.search(rf"set\(GGML_VERSION_{p} (\d+)\)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def _toml_version(path: Path) -> str:
    found = re.search(r'^version = "([^"]+)"', path.read_text(), re.M)
    return found.group(1) if found else "unknown"


def _knows_gemma4(source: Path) -> bool:
    """gguf-py has the arch, and the converter registers Gemma4ForConditionalGeneration."""
    constants = (source / "gguf-py" / "gguf" / "constants.py").read_text()
    converter_files = [source / "convert_hf_to_gguf.py", *sorted((source / "conversion").glob("*.py"))]
    registered = any('"Gemma4ForConditionalGeneration"' in f.read_text(errors="replace") for f in converter_files)
    return "GEMMA4" in constants and registered


# --- GGUF ----------------------------------------------------------------------------------------

def ensure_ggufs(checkpoint: Path, llama: LlamaCpp, workdir: Path) -> dict[str, ExportRecord]:
    """Q4_0 and Q4_K_M GGUFs of `checkpoint`, through a BF16 GGUF (deleted after: it is only a step)."""
    from importlib import metadata

    out = {kind: workdir / f"{checkpoint.name}.{kind}.gguf" for kind in GGUF_TYPES}
    if all(path.is_file() and record_path(path).is_file() for path in out.values()):
        return {kind: ExportRecord(**json.loads(record_path(path).read_text()), reused=True)
                for kind, path in out.items()}
    transformers = metadata.version("transformers")  # not imported: the parent stays light
    if int(transformers.split(".")[0]) < 5:
        raise SystemExit(f"llama.cpp's converter needs transformers >= 5 for gemma4 (found {transformers})")
    bf16 = workdir / f"{checkpoint.name}.BF16.gguf"
    convert = [PYTHON, llama.converter, checkpoint, "--outfile", bf16, "--outtype", "bf16"]
    _say(f"converting {checkpoint.name} to GGUF (BF16)")
    # The converter imports its `conversion` package from beside it: on the path even under PYTHONSAFEPATH.
    python_path = os.pathsep.join(filter(None, [str(llama.source), os.environ.get("PYTHONPATH")]))
    converted = run_measured(convert, log=workdir / f"{bf16.name}.log", min_free_bytes=MIN_FREE_MEM,
                             env={"PYTHONPATH": python_path})
    if not converted.ok:
        raise SystemExit(f"convert_hf_to_gguf.py failed: {converted.killed_reason or converted.output[-3000:]}")
    records = {}
    for kind, path in out.items():
        _say(f"llama-quantize {kind}")
        quantized = run_measured([llama.tool("llama-quantize"), bf16, path, kind], log=workdir / f"{path.name}.log",
                                 min_free_bytes=MIN_FREE_MEM)
        if not quantized.ok:
            raise SystemExit(f"llama-quantize {kind} failed: {quantized.killed_reason or quantized.output[-3000:]}")
        records[kind] = ExportRecord(
            bundle=str(path), command=f"convert_hf_to_gguf.py --outtype bf16, then llama-quantize {kind}",
            seconds=round(converted.wall_s + quantized.wall_s, 1),
            peak_rss_bytes=max(converted.peak_rss_bytes, quantized.peak_rss_bytes), bundle_bytes=path.stat().st_size,
            date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        records[kind].save(record_path(path))
    bf16.unlink()
    return records


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every tensor, but one row of each token table; the whole
    token table again when the head is tied to it (no output.weight)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    tables = ("token_embd.weight", "per_layer_token_embd.weight")
    total = sum(int(t.n_bytes) for name, t in tensors.items() if name not in tables)
    for name in tables:
        if name in tensors:
            total += int(tensors[name].n_bytes) // int(tensors[name].shape[-1])  # shape [row length, rows]
    if "output.weight" not in tensors:
        total += int(tensors["token_embd.weight"].n_bytes)
    return total


# --- edgekit bundles -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleSpec:
    fmt: str  # onnx | executorch
    recipe: str
    default: bool  # the profile's own recipe

    @property
    def device(self) -> str:
        return DEVICES[self.fmt]

    def path(self, workdir: Path, checkpoint: Path) -> Path:
        # the name bench_runtimes.py gives the same export, so either script reuses the other's bundles
        return workdir / f"{checkpoint.name}-{self.device}-{self.recipe}-text.edgekit"


def bundle_specs() -> list[BundleSpec]:
    """Each format's profile default, then its other recipes (devices.yaml decides the default)."""
    from edgekit.profiles import load_profiles

    profiles = load_profiles()
    specs = []
    for fmt in ("onnx", "executorch"):
        default = profiles.get(DEVICES[fmt]).recipe
        specs.append(BundleSpec(fmt, default, True))
        specs += [BundleSpec(fmt, recipe, False) for recipe in EXTRA_RECIPES[fmt] if recipe != default]
    return specs


def bundle_bytes_per_token(checkpoint: Path, spec: BundleSpec) -> int:
    """Weight bytes a decode step reads, from edgekit's plan (recipe bits x parameter counts): the
    text decoder (its own copy of the tied head included) and one row of each token table."""
    from edgekit.checkpoint import read_config
    from edgekit.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING
    from edgekit.models.family import PER_LAYER_EMBEDDING
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    text = read_config(checkpoint)["text_config"]
    rows = {METHOD_TOKEN_EMBEDDING: text["vocab_size"],
            PER_LAYER_EMBEDDING: text.get("vocab_size_per_layer_input") or text["vocab_size"]}
    plan = make_plan(checkpoint, profile=load_profiles().get(spec.device), recipe_name=spec.recipe, modalities="text")
    total = 0
    for component in plan.components:
        if component.name == METHOD_TEXT_DECODER:
            total += component.size_bytes
        elif component.name in rows:
            total += component.size_bytes // rows[component.name]
    return total


# --- rows and runs --------------------------------------------------------------------------------

@dataclass
class Row:
    runtime: str
    recipe: str
    path: Path
    bytes: int
    bytes_per_token: int
    made: ExportRecord
    env: dict[str, str] = field(default_factory=dict)
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.recipe}"


def run_llama_bench(row: Row, llama: LlamaCpp, args: argparse.Namespace) -> dict[str, Any]:
    drop_from_page_cache(row.path)
    report = args.workdir / "llama-bench.json"
    bench = [llama.tool("llama-bench"), "-m", row.path, "-p", str(args.prompt_tokens), "-n", str(args.decode_steps),
             "-r", "1", "-t", str(args.threads), "-o", "json"]
    # The JSON goes to a file, apart from the logs; `exec` keeps llama-bench the process wait4 measures.
    measured = run_measured(["sh", "-c", f'exec "$@" > "{report}"', "sh", *bench], env=row.env,
                            timeout_s=args.run_timeout)
    if not measured.ok:
        raise SystemExit(f"llama-bench failed ({measured.killed_reason or measured.returncode}):\n"
                         f"{measured.output[-3000:]}")
    tests = json.loads(report.read_text())
    prefill = next(t for t in tests if t["n_prompt"] == args.prompt_tokens and t["n_gen"] == 0)
    decode = next(t for t in tests if t["n_gen"] == args.decode_steps and t["n_prompt"] == 0)
    return {"prefill_tok_s": prefill["avg_ts"], "decode_tok_s": decode["avg_ts"],
            "peak_rss_bytes": measured.peak_rss_bytes, "build_commit": prefill.get("build_commit"),
            "n_threads": prefill.get("n_threads"), "cpu_info": prefill.get("cpu_info"),
            "load_average_1min_at_end": os.getloadavg()[0]}


def run_edgekit(row: Row, args: argparse.Namespace, et_binary: Path | None) -> dict[str, Any]:
    """One round of bench_runtimes.py's measurement in a child: the runner's backend, or et_decode."""
    if et_binary is not None:
        drop_from_page_cache(row.path)
        result = et_cpp.run_bundle(et_binary, row.path, prompt_ids(args.prompt_tokens), steps=args.decode_steps,
                                   repeats=1, prefix=without_mlock_privilege(), timeout=args.run_timeout)
    else:
        child_args = argparse.Namespace(threads=args.threads, prompt_tokens=args.prompt_tokens,
                                        decode_steps=args.decode_steps, repeats=1)
        result = run_bundle_child(child_args, row.path)
    return {**result, "prefill_tok_s": result["prefill_tok_s"][0], "decode_tok_s": result["decode_tok_s"][0],
            "peak_rss_bytes": result["life_peak_rss_bytes"]}


def measure_bandwidth(threads: int) -> float:
    """Read bandwidth in bytes/s: `threads` threads each summing its slice of a 1 GiB array (numpy
    releases the GIL in reductions), best of 5.

    Integers, not floats: numpy's pairwise float32 sum runs ~18 GiB/s from cache on this class of
    core, slower than memory can feed it; a uint64 add runs ~65 GiB/s from cache, so memory is
    what it measures."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(BANDWIDTH_BYTES // 8, np.uint64)  # written once, so every page is resident
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


# --- parent --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=("e2b-shape", "e4b-shape"), default="e2b-shape")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (0: full depth)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every row once (median shown)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of tables")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="checkpoints, GGUFs, bundles (reused)")
    parser.add_argument("--peers-cache", type=Path, default=DEFAULT_CACHE,
                        help="llama-cpp-python sdist, its sources and the llama.cpp build (reused)")
    parser.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="sdist version whose llama.cpp is built")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--et-python", action="store_true",
                        help="run ExecuTorch bundles through edgekit's Python runner instead of bench/et_decode")
    parser.add_argument("--export-timeout", type=float, default=3600, help="seconds per export")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds per measured run")
    parser.add_argument("--fresh", action="store_true", help="re-export the edgekit bundles")
    parser.add_argument("--child", choices=("bandwidth",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "bandwidth":
        return emit_result({"bytes_per_s": measure_bandwidth(args.threads)})

    if os.cpu_count() != args.threads:
        # ExecuTorch's thread pool has one thread per core whatever --threads says (et_cpp.py)
        _say(f"note: {os.cpu_count()} cores, --threads {args.threads}: ExecuTorch's pool uses one thread per core")
    llama = ensure_llama_cpp(args.peers_cache, args.llama_cpp_python)
    name = checkpoint_dir(args.workdir, args.layers or None, args.preset).name
    checkpoint, how = ensure_checkpoint(args.workdir, layers=args.layers or None, preset=args.preset,
                                        log=args.workdir / f"make-checkpoint-{name}.log")
    _say(f"checkpoint {checkpoint} ({how})")
    rows = gguf_rows(checkpoint, llama, args.workdir) + bundle_rows(checkpoint, args)
    et_binary = None
    if not args.et_python and any(row.runtime.startswith("executorch") for row in rows):
        et_binary = et_cpp.build(args.workdir / "et_decode-build")
    bandwidth, _ = run_child([PYTHON, Path(__file__).resolve(), "--child", "bandwidth", "--threads", str(args.threads)])
    for round_ in range(1, args.rounds + 1):
        for row in rows:
            _say(f"round {round_}/{args.rounds}: {row.name}")
            if row.runtime.startswith(LLAMA):
                result = run_llama_bench(row, llama, args)
            else:
                result = run_edgekit(row, args, et_binary if row.runtime.startswith("executorch") else None)
            row.raw.append(result)
            row.prefill_tok_s.append(result["prefill_tok_s"])
            row.decode_tok_s.append(result["decode_tok_s"])
            row.peak_rss_bytes.append(result["peak_rss_bytes"])
    raw = args.workdir / f"bench_peers-{checkpoint.name}.json"
    raw.write_text(json.dumps({"llama_cpp": llama.describe(), "bandwidth_bytes_per_s": bandwidth["bytes_per_s"],
                               "rows": [{**_json_row(row, rows), "runs": row.raw} for row in rows]},
                              indent=1, default=str) + "\n")
    if args.json:
        print(json.dumps([_json_row(row, rows) for row in rows], indent=1))
        return
    print(header(f"edgekit vs llama.cpp ({args.preset}, {args.layers or 'full'} layers, text only)",
                 packages=("onnxruntime", "executorch", "torch", "transformers", "gguf")))
    print(f"- llama.cpp: {llama.describe()}")
    print(f"- checkpoint: `{checkpoint}` ({how})")
    print(f"- workload: {args.prompt_tokens}-token prompt, {args.decode_steps} decode tokens, {args.threads} threads; "
          f"rounds: {args.rounds}, interleaved, median (min-max); each run a child process with its files evicted "
          "from the page cache; peak RSS = the child's whole life (llama-bench: ru_maxrss)\n")
    print(_made_table(rows))
    print()
    print(_results_table(rows, bandwidth["bytes_per_s"]))
    print(f"\nRoofline: read bandwidth {bandwidth['bytes_per_s'] / GIB:.1f} GiB/s ({args.threads} threads summing "
          f"{BANDWIDTH_BYTES / GIB:.0f} GiB); '% roofline' = decode tok/s x weight bytes read per step / bandwidth. "
          "Bytes per step: llama.cpp from the GGUF's tensors, edgekit from its plan (recipe bits x parameters); "
          "one row of each token table, the whole tied head.")
    print(f"\nraw results: `{raw}`")


def gguf_rows(checkpoint: Path, llama: LlamaCpp, workdir: Path) -> list[Row]:
    rows = []
    for kind, record in ensure_ggufs(checkpoint, llama, workdir).items():
        path = Path(record.bundle)
        for runtime, env in ((LLAMA, {}), (LLAMA_PASSIVE, {"OMP_WAIT_POLICY": "passive"})):
            rows.append(Row(runtime, kind, path, path.stat().st_size, gguf_bytes_per_token(path), record, env=env))
    return rows


def bundle_rows(checkpoint: Path, args: argparse.Namespace) -> list[Row]:
    rows = []
    for spec in bundle_specs():
        bundle = spec.path(args.workdir, checkpoint)
        _say(f"export {spec.fmt} {spec.recipe} -> {bundle.name}")
        record, measured = ensure_bundle(checkpoint, device=spec.device, quant=spec.recipe, modalities="text",
                                         bundle=bundle, fresh=args.fresh, log=args.workdir / f"{bundle.name}.log",
                                         timeout_s=args.export_timeout, min_free_bytes=MIN_FREE_MEM)
        if record is None:
            raise SystemExit(f"export {spec.fmt} {spec.recipe} failed: "
                             f"{measured.killed_reason or measured.output[-3000:]}")
        runtime = spec.fmt if spec.fmt == "onnx" or args.et_python else f"{spec.fmt} (C++ et_decode)"
        recipe = spec.recipe + (f" ({spec.device} default)" if spec.default else "")
        rows.append(Row(runtime, recipe, bundle, dir_bytes(bundle), bundle_bytes_per_token(checkpoint, spec), record))
    return rows


def _baseline(rows: list[Row]) -> Row:
    return next(row for row in rows if (row.runtime, row.recipe) == BASELINE)


def _json_row(row: Row, rows: list[Row]) -> dict[str, Any]:
    base = _baseline(rows)
    median = statistics.median
    return {"runtime": row.runtime, "recipe": row.recipe, "bytes": row.bytes,
            "prefill_tok_s": round(median(row.prefill_tok_s), 2), "decode_tok_s": round(median(row.decode_tok_s), 2),
            "peak_rss_mb": round(median(row.peak_rss_bytes) / MIB, 1),
            "ratio_decode": round(median(row.decode_tok_s) / median(base.decode_tok_s), 3),
            "ratio_prefill": round(median(row.prefill_tok_s) / median(base.prefill_tok_s), 3)}


def _made_table(rows: list[Row]) -> str:
    seen, out = set(), []
    for row in rows:
        if row.path in seen:
            continue
        seen.add(row.path)
        made = f"{row.made.seconds:,.0f} s" + (" (earlier run)" if row.made.reused else "")
        out.append([f"{row.runtime.removesuffix(' (C++ et_decode)')} {row.recipe}", f"{row.bytes / 1e6:,.0f} MB", made,
                    f"{row.made.peak_rss_bytes / MIB:,.0f} MiB", f"`{row.path.name}`"])
    return "Files (llama.cpp: convert + quantize; edgekit: `edgekit export`; peak RSS of that child)\n\n" + table(
        ["runtime, recipe", "file size", "made in", "peak RSS making it", "file"], out)


def _results_table(rows: list[Row], bandwidth: float) -> str:
    base = _baseline(rows)
    out = []
    for row in rows:
        decode = statistics.median(row.decode_tok_s)
        out.append([row.runtime, row.recipe, f"{row.bytes / 1e6:,.0f} MB", spread(row.prefill_tok_s, "{:.1f}"),
                    spread(row.decode_tok_s, "{:.1f}"), spread([b / MIB for b in row.peak_rss_bytes], "{:,.0f}"),
                    f"{statistics.median(row.prefill_tok_s) / statistics.median(base.prefill_tok_s):.2f}x",
                    f"{decode / statistics.median(base.decode_tok_s):.2f}x",
                    f"{row.bytes_per_token / 1e6:,.0f} MB", f"{decode * row.bytes_per_token / bandwidth:.0%}"])
    return (f"Side by side (ratios to {' '.join(BASELINE)})\n\n" + table(
        ["runtime", "recipe", "file", "prefill tok/s", "decode tok/s", "peak RSS (MiB)", "prefill ratio",
         "decode ratio", "weights read / decode step", "% roofline"], out))


if __name__ == "__main__":
    main()
