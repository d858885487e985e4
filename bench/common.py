"""Shared pieces of the bench/ scripts: headers, children measured apart, memory, tables.

    script (parent, light) ─► `edgekit make-checkpoint` / `edgekit export` children, each
        measured with os.wait4 (its own ru_maxrss) and, when asked, a memory watchdog
    ─► measurement children (`--child ...`) that print one JSON line ─► markdown tables

Every number a table shows is measured by the run that prints it, or read from a JSON
record an earlier run of the same script wrote beside the artefact (marked "earlier run").
Nothing here imports torch, transformers or onnxruntime.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("/tmp/edgekit-bench")
PYTHON = sys.executable
# The `edgekit` console script of the interpreter running the bench (the venv's).
EDGEKIT = [PYTHON, "-m", "edgekit"]
RESULT_MARK = "BENCH_RESULT "
GIB = 1024**3
MIB = 1024**2


# --- header --------------------------------------------------------------------------------

def command_line() -> str:
    """The exact command that is running, for the top of every table."""
    argv = [shlex.quote(a) for a in sys.argv]
    script = Path(sys.argv[0])
    if script.is_file():
        try:
            argv[0] = str(script.resolve().relative_to(REPO))
        except ValueError:
            argv[0] = str(script.resolve())
    python = os.path.relpath(PYTHON, REPO) if PYTHON.startswith(str(REPO)) else PYTHON
    return f"{python} {' '.join(argv)}"


def profile_arguments(doc: str, *, bundles: str, steps: int, top: int, listed: str) -> argparse.ArgumentParser:
    """The command line the decode profilers share: bundles, prompt length, steps, rows listed."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("bundles", type=Path, nargs="+", help=f"{bundles} bundles (.edgekit directories)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps, help="greedy decode steps profiled")
    parser.add_argument("--top", type=int, default=top, help=f"{listed} listed per bundle")
    return parser


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_bytes() -> int:
    return _meminfo()["MemTotal"]


def package_versions(names: Sequence[str]) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def header(title: str, *, packages: Sequence[str] = ("torch", "transformers", "onnxruntime", "onnx")) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())
    return "\n".join([
        f"## {title}",
        "",
        f"- command: `{command_line()}`",
        f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} cores, {mem_total_bytes() / GIB:.1f} GiB RAM, CPU {cpu_model()}, "
        f"{platform.system()} {platform.release()}",
        f"- software: Python {platform.python_version()}, {versions}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min; the machine is "
        "shared, so compare only ratios measured in the same run)",
        "",
    ])


# --- memory of this process ----------------------------------------------------------------

def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        parts = value.split()
        out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def mem_available_bytes() -> int:
    return _meminfo()["MemAvailable"]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes (0 if gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSwap"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs).

    Lets one process measure the peak of one phase (the decode loop) apart from the load
    and the prefill before it. False where the kernel refuses.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mapped_rss(suffixes: Sequence[str] = (".onnx.data", ".onnx", ".pte", ".ptd")) -> dict[str, int]:
    """Resident bytes of this process's file mappings whose path ends with one of `suffixes`,
    by file name.

    From /proc/self/smaps: tells weights read through mmap (file pages, shared with the page
    cache, droppable) from weights copied into the heap (anonymous, counted in RssAnon).
    """
    from edgekit.runtimes.mapped_pages import mappings

    out: dict[str, int] = {}
    for mapping in mappings():
        if mapping.path.endswith(tuple(suffixes)):
            name = Path(mapping.path).name
            out[name] = out.get(name, 0) + mapping.resident_bytes
    return out


def emit_result(result: dict[str, Any]) -> None:
    """A measurement child's last stdout line; the parent parses it with `run_child`."""
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- children ------------------------------------------------------------------------------

@dataclass
class Measured:
    """A finished child: exit status, wall time, its own peak RSS (ru_maxrss via wait4)."""

    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    output: str = ""
    killed_reason: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed_reason


def _tree_pids(root: int) -> list[int]:
    """`root` and its descendants, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss_bytes(root: int) -> int:
    return sum(proc_status(pid).get("VmRSS", 0) for pid in _tree_pids(root))


def tree_anon_bytes(root: int) -> int:
    """Anonymous (heap) part of the tree's RSS: file-backed pages are page cache, droppable."""
    return sum(proc_status(pid).get("RssAnon", 0) for pid in _tree_pids(root))


def _raise_oom_score() -> None:
    # If memory runs out anyway, the kernel should kill the benchmark child first,
    # not another engineer's test run.
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def run_measured(cmd: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None,
                 timeout_s: float | None = None, min_free_bytes: int | None = None,
                 sample_every_s: float = 0.5, on_sample: Callable[[dict[str, Any]], None] | None = None,
                 echo: bool = False) -> Measured:
    """Run `cmd` in its own process group; return its wall time and peak RSS.

    Peak RSS is the child's ru_maxrss from os.wait4 (the largest of the child and the
    descendants it waited for), so the parent's own memory never mixes in. With
    `min_free_bytes`, the whole group is killed when MemAvailable drops below it (the
    machine is shared); with `timeout_s`, when it runs longer. Output goes to `log`
    (or is captured and returned).
    """
    cmd = [str(c) for c in cmd]
    out_file = open(log, "w") if log else subprocess.PIPE if not echo else None
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True, preexec_fn=_raise_oom_score, text=True, cwd=REPO)
    samples: list[dict[str, Any]] = []
    captured: list[str] = []
    if out_file is subprocess.PIPE:
        # Read output on a thread so a chatty child never blocks on a full pipe.
        import threading

        reader = threading.Thread(target=lambda: captured.extend(proc.stdout), daemon=True)
        reader.start()
    # If this script is stopped (Ctrl-C, `timeout`), take the child's process group with it:
    # it runs in its own session, so the signal would not reach it.
    def _stop(signum, _frame):
        _kill_group(proc.pid)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        status, rusage, killed, samples = _watch(proc, started, samples, min_free_bytes=min_free_bytes,
                                                 timeout_s=timeout_s, sample_every_s=sample_every_s,
                                                 on_sample=on_sample)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if out_file is subprocess.PIPE:
        reader.join(timeout=10)
    elif out_file:
        out_file.close()
    output = "".join(captured) if captured else (log.read_text(errors="replace") if log else "")
    return Measured(cmd=cmd, returncode=proc.returncode, wall_s=wall, peak_rss_bytes=rusage.ru_maxrss * 1024,
                    output=output, killed_reason=killed, samples=samples)


def _watch(proc: subprocess.Popen, started: float, samples: list[dict[str, Any]], *, min_free_bytes: int | None,
           timeout_s: float | None, sample_every_s: float,
           on_sample: Callable[[dict[str, Any]], None] | None) -> tuple[int, Any, str, list[dict[str, Any]]]:
    """Poll the child until it exits (or kill it); returns (wait status, rusage, why killed, samples)."""
    killed = ""
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            return status, rusage, killed, samples
        elapsed = time.perf_counter() - started
        if min_free_bytes is not None or on_sample is not None:
            sample = {"t_s": round(elapsed, 1), "available_bytes": mem_available_bytes(),
                      "tree_rss_bytes": tree_rss_bytes(proc.pid), "tree_anon_bytes": tree_anon_bytes(proc.pid)}
            samples.append(sample)
            if on_sample:
                on_sample(sample)
            if min_free_bytes is not None and sample["available_bytes"] < min_free_bytes:
                killed = (f"killed at {elapsed:.0f} s: MemAvailable {sample['available_bytes'] / GIB:.2f} GiB "
                          f"< {min_free_bytes / GIB:.1f} GiB while the child's tree held "
                          f"{sample['tree_rss_bytes'] / GIB:.2f} GiB RSS "
                          f"({sample['tree_anon_bytes'] / GIB:.2f} GiB anonymous)")
        if not killed and timeout_s is not None and elapsed > timeout_s:
            killed = f"killed at {elapsed:.0f} s: timeout {timeout_s:.0f} s"
        if killed:
            _kill_group(proc.pid)
            _, status, rusage = os.wait4(proc.pid, 0)
            return status, rusage, killed, samples
        time.sleep(sample_every_s)


def _kill_group(pid: int) -> None:
    """SIGTERM the child's own process group (it was started in a new session), then SIGKILL.

    Never reaps the child: the caller's os.wait4 collects its status and rusage.
    """
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and not _exited(pid):
            time.sleep(0.2)
        if _exited(pid):
            return


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def without_mlock_privilege() -> list[str]:
    """A command prefix that runs a child without CAP_IPC_LOCK when this is root.

    ExecuTorch's Python runtime maps a program with MmapDataLoader(UseMlockIgnoreErrors): as
    root (CAP_IPC_LOCK) the whole constant segment is locked resident; an app or a user on a
    device has RLIMIT_MEMLOCK (8 MiB here), mlock fails, is ignored, and the weights stay
    mapped on demand. Dropping the capability measures what a device sees.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--inh-caps", "-ipc_lock", "--bounding-set", "-ipc_lock"]


def run_child(cmd: Sequence[str], **kwargs: Any) -> tuple[dict[str, Any], Measured]:
    """Run a measurement child and parse its `emit_result` line; raise with its output on failure."""
    measured = run_measured(cmd, **kwargs)
    result = None
    for line in measured.output.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    if not measured.ok or result is None:
        tail = "\n".join(measured.output.splitlines()[-30:])
        raise SystemExit(f"child failed (exit {measured.returncode}{', ' + measured.killed_reason if measured.killed_reason else ''}):"
                         f" {' '.join(measured.cmd)}\n{tail}")
    return result, measured


# --- artefacts: checkpoints and bundles, reused when present -------------------------------

def checkpoint_dir(workdir: Path, layers: int | None, preset: str = "e2b-shape") -> Path:
    return workdir / (f"{preset}-L{layers}" if layers else f"{preset}-full")


def ensure_checkpoint(workdir: Path, *, layers: int | None, log: Path | None = None,
                      preset: str = "e2b-shape") -> tuple[Path, str]:
    """The `preset` checkpoint (cut to `layers`), written once; returns (dir, how)."""
    path = checkpoint_dir(workdir, layers, preset)
    if (path / "config.json").is_file():
        return path, "reused"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [*EDGEKIT, "make-checkpoint", preset, path]
    if layers:
        cmd += ["--layers", str(layers)]
    measured = run_measured(cmd, log=log)
    if not measured.ok:
        raise SystemExit(f"make-checkpoint failed: {measured.killed_reason or measured.output[-2000:]}")
    return path, f"written in {measured.wall_s:.0f} s"


@dataclass
class ExportRecord:
    """How a bundle was made; saved as `<bundle>.export.json` so a reused bundle keeps it."""

    bundle: str
    command: str
    seconds: float
    peak_rss_bytes: int
    bundle_bytes: int
    date: str
    reused: bool = False

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({k: v for k, v in asdict(self).items() if k != "reused"}, indent=2) + "\n")


def record_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".export.json")


def ensure_bundle(checkpoint: Path, *, device: str, quant: str, modalities: str | None, bundle: Path,
                  fresh: bool = False, log: Path | None = None, timeout_s: float | None = None,
                  min_free_bytes: int | None = None, extra_args: Sequence[str] = (),
                  on_sample: Callable[[dict[str, Any]], None] | None = None) -> tuple[ExportRecord | None, Measured | None]:
    """Export `checkpoint` with `edgekit export` in a measured child, unless done before.

    Returns (record, measured); record is None when the export failed (see measured).
    """
    rec_file = record_path(bundle)
    if not fresh and (bundle / "manifest.json").is_file() and rec_file.is_file():
        record = ExportRecord(**json.loads(rec_file.read_text()), reused=True)
        return record, None
    cmd = [*EDGEKIT, "export", checkpoint, "--device", device, "--quant", quant, "-o", bundle, "--overwrite",
           "--json"]
    if modalities:
        cmd += ["--modalities", modalities]
    cmd += list(extra_args)
    measured = run_measured(cmd, log=log, timeout_s=timeout_s, min_free_bytes=min_free_bytes, on_sample=on_sample,
                            env={"EDGEKIT_PROGRESS": "0"})
    if not measured.ok:
        return None, measured
    pretty = " ".join(shlex.quote(str(c)) for c in ["edgekit", *measured.cmd[3:]])
    record = ExportRecord(bundle=str(bundle), command=pretty, seconds=round(measured.wall_s, 1),
                          peak_rss_bytes=measured.peak_rss_bytes, bundle_bytes=dir_bytes(bundle),
                          date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    record.save(rec_file)
    return record, measured


def dir_bytes(path: Path) -> int:
    """Apparent size of every file under `path` (what a user copies to the device)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def drop_from_page_cache(path: Path) -> None:
    """Evict a bundle's (or a file's) clean pages (POSIX_FADV_DONTNEED), so every measured run maps it cold.

    A bundle the export has just written sits in the page cache in 2 MiB folios, and each
    looked-up table row then makes ~2 MiB resident instead of ~0.2 (RESULTS.md section 1):
    without this a run's RSS depends on what ran before it.
    """
    files = [Path(path)] if Path(path).is_file() else Path(path).rglob("*")  # a bundle, or one file (a GGUF)
    for file in files:
        if not file.is_file():
            continue
        # Pages an earlier process locked (ExecuTorch's Python runtime mlocks a program as root)
        # can outlive it unevictable for a while: try again, then say so rather than measure warm.
        for _ in range(3):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            cached = cached_bytes(file)
            if not cached:
                break
            time.sleep(1)
        if cached and cached > (16 << 20):
            print(f"warning: {cached / 2**20:,.0f} MiB of {file.name} stay in the page cache; "
                  "this run maps it warm", file=sys.stderr)


def cached_bytes(file: Path) -> int:
    """Bytes of `file` in the page cache (mincore), 0 where it cannot be told."""
    import ctypes
    import mmap

    from edgekit.runtimes.mapped_pages import linux_libc

    size = file.stat().st_size
    if not size or linux_libc() is None:
        return 0
    page = mmap.PAGESIZE
    with open(file, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        libc = linux_libc()
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        ok = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0
        del address
        resident = sum(b & 1 for b in vec) * page if ok else 0
    return resident


def disk_free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


# --- formatting ----------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
