"""ExecuTorch's C++ runtime, as an app holds a .pte: build bench/et_decode and run it.

The executorch wheel ships the runtime's shared libraries, headers and a CMake package
(`<site-packages>/executorch/share/cmake`); et_decode is built against them with CMake, so the
numbers are those of the same kernels and XNNPACK delegate the Python bindings use, without
Python, torch or the bindings' imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "et_decode"


class BuildError(RuntimeError):
    pass


def cmake_package_dir() -> Path:
    """`share/cmake` of the installed executorch wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("executorch is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "share" / "cmake"
    if not (path / "executorch-config.cmake").is_file():
        raise BuildError(f"this executorch wheel ships no CMake package ({path})")
    return path


def build(build_dir: Path) -> Path:
    """Configure and build et_decode in `build_dir` (incremental); returns the binary."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building et_decode needs {tool} on PATH")
    build_dir.mkdir(parents=True, exist_ok=True)
    _forget_other_source(build_dir)
    steps = (["cmake", "-S", str(SOURCE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              f"-Dexecutorch_DIR={cmake_package_dir()}"],
             ["cmake", "--build", str(build_dir), "--parallel", "2"])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(cmd[:2])} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return build_dir / "et_decode"


def _forget_other_source(build_dir: Path) -> None:
    """CMake refuses a build folder configured from another copy of the sources (a git worktree,
    a moved checkout): drop that configuration, the cache and its CMakeFiles, and keep the rest."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return
    home = next((line.partition("=")[2] for line in cache.read_text().splitlines()
                 if line.startswith("CMAKE_HOME_DIRECTORY:")), None)
    if home is not None and Path(home).resolve() != SOURCE.resolve():
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


def run_bundle(binary: Path, path: Path, prompt: list[int], **kwargs: Any) -> dict[str, Any]:
    """`run` on an edgekit ExecuTorch bundle's program (and its .ptd, if the manifest names one)."""
    from edgekit.bundle import load_bundle
    from edgekit.manifest import METHOD_TEXT_DECODER

    bundle = load_bundle(path)
    data = bundle.manifest.extra.get("program_data")
    return run(binary, bundle.file(bundle.manifest.method(METHOD_TEXT_DECODER).file), prompt,
               data=bundle.file(data) if data else None, **_kernels_for(bundle.manifest), **kwargs)


def _kernels_for(manifest) -> dict[str, Any]:
    """run()'s kernels / env for a program calling ExecuTorch's LLM custom ops. The wheel ships
    their kernels only in its ahead-of-time library, which links libtorch and torch's Python
    bindings, so et_decode loads it with libpython preloaded; what that costs shows in the
    result's status_before_load (the stock runners compile the same kernels in, without torch)."""
    from edgekit.runtimes.backends.executorch_backend import llm_ops_library, needs_llm_ops

    if not needs_llm_ops(manifest):
        return {}
    library = llm_ops_library()
    libpython = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("LDLIBRARY") or "")
    if library is None or not libpython.is_file() or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise BuildError("this program calls ExecuTorch's LLM custom ops; et_decode needs the executorch "
                         "wheel's custom-ops library and a shared libpython to load it")
    return {"kernels": [library], "env": {**os.environ, "LD_PRELOAD": str(libpython)}}


def run(binary: Path, pte: Path, prompt: list[int], *, steps: int, repeats: int, data: Path | None = None,
        kernels: list[Path] = (), env: dict[str, str] | None = None, prefix: list[str] | None = None,
        lean_memory: bool = False, timeout: float = 1800) -> dict[str, Any]:
    """et_decode's measurement, in bench_runtimes.measure_generation's result shape (plus
    `prefill_top`: [token id, logit] of the first prefill's five largest logits)."""
    cmd = [*(prefix or []), str(binary), *(["--data", str(data)] if data else []),
           *(arg for library in kernels for arg in ("--kernels", str(library))),
           *(["--lean-memory"] if lean_memory else []), str(pte), str(steps),
           str(repeats), *map(str, prompt)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if " E " in line or line.startswith("et_decode")]
        raise RuntimeError(f"et_decode exited {done.returncode}: " + "\n".join(tail[-10:] or done.stderr.splitlines()[-10:]))
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "runtime": raw["runtime"],
        "load_s": raw["load_s"],
        "threads": os.cpu_count(),  # ExecuTorch's thread pool: one thread per core
        "status_before_load": raw["status_before_load"],
        "status_after_load": raw["status_after_load"],
        "status_after_decode": raw["status_after_decode"],
        "load_average_1min_at_end": os.getloadavg()[0],
        "prefill_tok_s": [len(prompt) / s for s in raw["prefill_s"]],
        "decode_tok_s": [steps / s for s in raw["decode_s"]],
        "decode_peak_rss_bytes": raw["decode_peak_rss_bytes"],
        "life_peak_rss_bytes": raw["life_peak_rss_bytes"],
        "tokens": raw["tokens"],
        "prefill_top": raw["prefill_top"],
        "max_seq_len": raw["max_seq_len"],
    }
