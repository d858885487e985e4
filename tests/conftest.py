"""Shared fixtures: random-weight checkpoints written once per test session.

They go through `make_checkpoint`, the same code `edgekit make-checkpoint` runs, and
are loaded through the same path as a downloaded checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.progress import STAGE_PREFIX

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _private_integrity_cache(tmp_path_factory) -> None:
    """Bundles opened by tests (and the CLI runs they start) remember their hashes in a
    cache of the session's own, not the user's (edgekit.integrity_cache)."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="session")
def tiny_e2b(tmp_path_factory) -> Path:
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.models.gemma4.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ckpt") / "tiny-e2b", seed=0)


@pytest.fixture(scope="session")
def tiny_e4b(tmp_path_factory) -> Path:
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.models.gemma4.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e4b"], tmp_path_factory.mktemp("ckpt") / "tiny-e4b", seed=0)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m edgekit ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout, input=input)


def assert_clean_failure(result: subprocess.CompletedProcess, *, code: int | None = None,
                         contains: str | None = None) -> None:
    """A bad input gives a non-zero exit and one error line on stderr (after any stage lines
    of the work done before it), without a traceback."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(STAGE_PREFIX)]
    assert len(lines) == 1, result.stderr
    if contains is not None:
        assert contains in lines[0], lines[0]


# --- exported bundles, shared by the export, runner and app tests (each export ~50 s) ----

@pytest.fixture(scope="session")
def onnx_fp32_bundle(tiny_e2b, tmp_path_factory) -> Path:
    """tiny-e2b, every modality, fp32, for the pi5 profile: the parity reference bundle."""
    from edgekit.export.onnx.exporter import export_onnx
    from edgekit.checkpoint import load
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    plan = make_plan(tiny_e2b, profile=load_profiles().get("pi5-8gb"), recipe_name="fp32",
                     modalities="text,audio,vision")
    out = tmp_path_factory.mktemp("bundles") / "tiny-e2b-fp32.edgekit"
    return export_onnx(load(tiny_e2b), plan=plan, output=out).path


@pytest.fixture(scope="session")
def onnx_int4_bundle(tiny_e4b, tmp_path_factory) -> Path:
    """tiny-e4b through the CLI with the pi5 profile's own recipe (int4-b128)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-e4b-int4.edgekit"
    result = run_cli("export", str(tiny_e4b), "--device", "pi5-8gb", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    (out.parent / "export.stderr").write_text(result.stderr)  # its stage lines: test_onnx_export
    return out


@pytest.fixture(scope="session")
def tiny_e2b_4layers(tmp_path_factory) -> Path:
    """tiny-e2b cut to 4 layers: a sliding, a global and a shared-KV layer."""
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.models.gemma4.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ckpt") / "tiny-e2b-4", seed=0, layers=4)


# ExecuTorch bundles are exported in background processes, all started with the test session
# (lowering is single-threaded and slow: ~3 min for fp32, ~4.5 for e4b; a failed torch.export
# can poison its process), and the tests that wait for them run last.
EXECUTORCH_CONTEXT = 256  # room for verify's image + audio + text prompt and 64 steps
EXECUTORCH_VISION_BUDGET = 70
_EXPORT_FP32 = """
import dataclasses, sys
from pathlib import Path
from edgekit.export.executorch.exporter import export_executorch
from edgekit.checkpoint import load
from edgekit.plan import make_plan
from edgekit.profiles import load_profiles
ckpt, out, context, budget = sys.argv[1:5]
plan = make_plan(Path(ckpt), profile=load_profiles().get("android-flagship"), recipe_name="fp32",
                 modalities="text,vision,audio", context=int(context))
export_executorch(load(ckpt), plan=dataclasses.replace(plan, vision_token_budget=int(budget)), output=Path(out))
"""


class ExportJob:
    """One export in a child process; its output goes to files (no pipe to fill up)."""

    def __init__(self, argv: list[str], out: Path, *, nice: int = 0) -> None:
        self.out = out
        self._log = out.with_suffix(".log")
        self._err = out.with_suffix(".stderr")
        with open(self._log, "w") as log, open(self._err, "w") as err:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=err, text=True, cwd=ROOT,
                                          preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def result(self, timeout: float = 1500) -> tuple[str, str]:
        """(stdout, stderr) once it exits 0; fails the test with the log's tail otherwise."""
        code = self._proc.wait(timeout=timeout)
        stdout, stderr = self._log.read_text(), self._err.read_text()
        assert code == 0, f"export of {self.out.name} failed ({code}):\n{(stdout + stderr)[-4000:]}"
        return stdout, stderr

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


class ExportJobs:
    """Named export jobs, each started once: when the session starts (those the collected
    tests use) or when first asked for."""

    def __init__(self, factories: dict) -> None:
        self._factories = factories
        self._jobs: dict[str, ExportJob] = {}

    def get(self, name: str) -> ExportJob:
        if name not in self._jobs:
            self._jobs[name] = self._factories[name]()
        return self._jobs[name]

    def kill_all(self) -> None:
        for job in self._jobs.values():
            job.kill()


@pytest.fixture(scope="session")
def executorch_exports(request, tiny_e2b, tiny_e4b, tmp_path_factory) -> ExportJobs:
    """The ExecuTorch test bundles' exports; those the collected tests use start at once."""
    pytest.importorskip("executorch.runtime")
    out = tmp_path_factory.mktemp("et")
    cli = [sys.executable, "-m", "edgekit", "export"]
    jobs = ExportJobs({
        "fp32": lambda: ExportJob([sys.executable, "-c", _EXPORT_FP32, str(tiny_e2b), str(out / "fp32.edgekit"),
                                   str(EXECUTORCH_CONTEXT), str(EXECUTORCH_VISION_BUDGET)], out / "fp32.edgekit"),
        "e4b": lambda: ExportJob([*cli, str(tiny_e4b), "--device", "android-flagship", "--context",
                                  str(EXECUTORCH_CONTEXT * 4), "-o", str(out / "e4b.edgekit"), "--json",
                                  "--external-weights"], out / "e4b.edgekit"),
    })
    used = _waited_for(request)
    if "executorch_bundles" in used:
        jobs.get("e4b"), jobs.get("fp32")
    yield jobs
    jobs.kill_all()


def _bundles_waited_for(item) -> set[str]:
    """Which background-exported bundle fixtures a test waits for (by name, or through a
    parameter marked `executorch_bundles` that looks them up at run time)."""
    used = {"executorch_bundles", "coreml_bundles", "plan_size_bundle"} & set(getattr(item, "fixturenames", ()))
    if item.get_closest_marker("executorch_bundles") is not None:
        used.add("executorch_bundles")
    return used


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests that wait for the background ExecuTorch exports run last, so every other test
    runs while the exports do (same relative order otherwise); the arm64 emulation tier
    only when asked for."""
    # The arm64 emulation tier runs only when named (-m arm_emulation, `make test-arm`): it
    # needs root and builds a Debian root once (~6 min), so a plain run or `-m slow` leaves it out.
    if "arm_emulation" not in (config.option.markexpr or ""):
        arm = [item for item in items if item.get_closest_marker("arm_emulation") is not None]
        if arm:
            config.hook.pytest_deselected(items=arm)
            items[:] = [item for item in items if item.get_closest_marker("arm_emulation") is None]
    waits = [bool(_bundles_waited_for(item)) for item in items]
    items[:] = [i for i, w in zip(items, waits) if not w] + [i for i, w in zip(items, waits) if w]


@pytest.fixture(scope="session", autouse=True)
def _start_background_exports_early(request) -> None:
    """Start the background exports with the session, so they overlap every other test."""
    used = _waited_for(request)
    if "executorch_bundles" in used and importlib.util.find_spec("executorch.runtime") is not None:
        request.getfixturevalue("executorch_exports")
    if "coreml_bundles" in used and importlib.util.find_spec("coremltools") is not None:
        request.getfixturevalue("coreml_exports")
    if "plan_size_bundle" in used:
        request.getfixturevalue("plan_size_exports")


def _waited_for(request) -> set[str]:
    return {name for item in request.session.items for name in _bundles_waited_for(item)}


@pytest.fixture(scope="session")
def executorch_bundles(executorch_exports) -> dict:
    """Two bundles:
    fp32: tiny-e2b, text + vision (budget 70) + audio, context 256: the parity reference.
    e4b: tiny-e4b, every method, through `edgekit export --json --external-weights` with
    android-flagship's own recipe (8da4w-emb4); its JSON summary under "e4b_summary"."""
    from edgekit.bundle import load_bundle

    fp32, e4b = executorch_exports.get("fp32"), executorch_exports.get("e4b")
    fp32.result()
    summary, _ = e4b.result()
    return {"fp32": load_bundle(fp32.out), "e4b": load_bundle(e4b.out), "e4b_summary": json.loads(summary)}


# Core ML bundles, exported in the background as the ExecuTorch ones are (each converts the
# decoder twice, the vision encoder and five audio buckets: ~1.5 min of CPU).
COREML_CONTEXT = 768  # mac-m-series' 560 image tokens + audio + text + 64 steps


@pytest.fixture(scope="session")
def coreml_exports(tiny_e2b, tiny_e4b, tmp_path_factory) -> ExportJobs:
    """e2b: tiny-e2b through `edgekit export --device iphone-15-pro`, the profile's defaults
    (int4-ple2, every modality); e4b: tiny-e4b for mac-m-series at fp16, every modality."""
    pytest.importorskip("coremltools")
    out = tmp_path_factory.mktemp("coreml")
    cli = [sys.executable, "-m", "edgekit", "export"]
    jobs = ExportJobs({
        "e2b": lambda: ExportJob([*cli, str(tiny_e2b), "--device", "iphone-15-pro", "--context", str(COREML_CONTEXT),
                                  "-o", str(out / "e2b.edgekit"), "--json"], out / "e2b.edgekit"),
        "e4b": lambda: ExportJob([*cli, str(tiny_e4b), "--device", "mac-m-series", "--quant", "fp16", "--context",
                                  str(COREML_CONTEXT), "-o", str(out / "e4b.edgekit"), "--json"], out / "e4b.edgekit"),
    })
    jobs.get("e2b"), jobs.get("e4b")
    yield jobs
    jobs.kill_all()


@pytest.fixture(scope="session")
def coreml_bundles(coreml_exports) -> dict:
    """{"e2b": (bundle, export summary), "e4b": (bundle, export summary)}, loaded."""
    from edgekit.bundle import load_bundle

    found = {}
    for name in ("e2b", "e4b"):
        job = coreml_exports.get(name)
        summary, _ = job.result()
        found[name] = (load_bundle(job.out), json.loads(summary))
    return found


# --- plan-vs-bundle sizes: every (format, backend, recipe) an exporter writes (tests/plan_sizes.py) ---

@pytest.fixture(scope="session")
def plan_size_checkpoint(tmp_path_factory) -> Path:
    from tests.plan_sizes import make

    return make(tmp_path_factory.mktemp("ckpt") / "plan-sizes")


@pytest.fixture(scope="session")
def plan_size_exports(plan_size_checkpoint, tmp_path_factory) -> ExportJobs:
    """One background process per format exports its cases one after another (the ExecuTorch
    cases only where executorch imports, Core ML's only where coremltools does). They run
    niced: their tests run last, so they take the CPU the other tests leave idle instead of
    slowing those down (~60 s of CPU for ONNX, ~170 s for ExecuTorch, ~120 s for Core ML)."""
    from tests.plan_sizes import cases

    out = tmp_path_factory.mktemp("plan-sizes")
    formats = (["onnx"] + (["executorch"] if importlib.util.find_spec("executorch.runtime") is not None else [])
               + (["coreml"] if importlib.util.find_spec("coremltools") is not None else []))

    def job(fmt: str) -> ExportJob:
        ids = [c.id for c in cases() if c.format == fmt]
        return ExportJob([sys.executable, "-m", "tests.plan_sizes", str(plan_size_checkpoint), str(out / fmt), *ids],
                         out / fmt, nice=10)

    jobs = ExportJobs({fmt: (lambda fmt=fmt: job(fmt)) for fmt in formats})
    for fmt in formats:
        jobs.get(fmt)
    yield jobs
    jobs.kill_all()


@pytest.fixture
def plan_size_bundle(plan_size_exports):
    """Waits for a case's background export: the bundle, loaded (a failed export fails the test
    with its traceback)."""
    from edgekit.bundle import load_bundle
    from tests.plan_sizes import bundle_path, error_path

    def get(case):
        if case.format == "executorch":
            pytest.importorskip("executorch.runtime")
        if case.format == "coreml":
            pytest.importorskip("coremltools")
        job = plan_size_exports.get(case.format)
        job.result()
        if error_path(job.out, case).exists():
            pytest.fail(f"export of {case.id} failed:\n{error_path(job.out, case).read_text()[-4000:]}")
        return load_bundle(bundle_path(job.out, case))

    return get
