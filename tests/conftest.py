"""Shared fixtures: random-weight checkpoints written once per test session.

They go through `make_checkpoint`, the same code `edgekit make-checkpoint` runs, and
are loaded through the same path as a downloaded checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_e2b(tmp_path_factory) -> Path:
    from edgekit.checkpoint_writer import make_checkpoint
    from edgekit.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ckpt") / "tiny-e2b", seed=0)


@pytest.fixture(scope="session")
def tiny_e4b(tmp_path_factory) -> Path:
    from edgekit.checkpoint_writer import make_checkpoint
    from edgekit.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e4b"], tmp_path_factory.mktemp("ckpt") / "tiny-e4b", seed=0)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m edgekit ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout, input=input)


def assert_clean_failure(result: subprocess.CompletedProcess, *, code: int | None = None,
                         contains: str | None = None) -> None:
    """A bad input gives a non-zero exit and one line on stderr, without a traceback."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    if contains is not None:
        assert contains in lines[0], lines[0]


# --- exported bundles, shared by the export, runner and app tests (each export ~50 s) ----

@pytest.fixture(scope="session")
def onnx_fp32_bundle(tiny_e2b, tmp_path_factory) -> Path:
    """tiny-e2b, every modality, fp32, for the pi5 profile: the parity reference bundle."""
    from edgekit.export.onnx.exporter import export_onnx
    from edgekit.model import load
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    plan = make_plan(tiny_e2b, profile=load_profiles().get("pi5-8gb"), recipe_name="fp32",
                     modalities="text,audio,vision")
    out = tmp_path_factory.mktemp("bundles") / "tiny-e2b-fp32.edgekit"
    return export_onnx(load(tiny_e2b), plan=plan, output=out).path


@pytest.fixture(scope="session")
def onnx_int4_bundle(tiny_e4b, tmp_path_factory) -> Path:
    """tiny-e4b through the CLI with the pi5 profile's own recipe (int4)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-e4b-int4.edgekit"
    result = run_cli("export", str(tiny_e4b), "--device", "pi5-8gb", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def tiny_e2b_4layers(tmp_path_factory) -> Path:
    """tiny-e2b cut to 4 layers: a sliding, a global and a shared-KV layer."""
    from edgekit.checkpoint_writer import make_checkpoint
    from edgekit.presets import PRESETS

    return make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ckpt") / "tiny-e2b-4", seed=0, layers=4)


# ExecuTorch bundles are exported in concurrent processes (lowering is single-threaded and
# slow, ~2.5 min for fp32; a failed torch.export can poison its process).
EXECUTORCH_CONTEXT = 256  # room for verify's image + audio + text prompt and 64 steps
EXECUTORCH_VISION_BUDGET = 70
_EXPORT_FP32 = """
import dataclasses, sys
from pathlib import Path
from edgekit.export.executorch.exporter import export_executorch
from edgekit.model import load
from edgekit.plan import make_plan
from edgekit.profiles import load_profiles
ckpt, out, context, budget = sys.argv[1:5]
plan = make_plan(Path(ckpt), profile=load_profiles().get("android-flagship"), recipe_name="fp32",
                 modalities="text,vision,audio", context=int(context))
export_executorch(load(ckpt), plan=dataclasses.replace(plan, vision_token_budget=int(budget)), output=Path(out))
"""


@pytest.fixture(scope="session")
def executorch_bundles(tiny_e2b, tiny_e4b, tmp_path_factory) -> dict:
    """Two bundles, exported concurrently:
    fp32: tiny-e2b, text + vision (budget 70) + audio, context 256: the parity reference.
    e4b: tiny-e4b, every method, through `edgekit export --json` with android-flagship's own
    recipe (8da4w-emb4); its JSON summary under "e4b_summary"."""
    from edgekit.bundle import load_bundle

    pytest.importorskip("executorch.runtime")
    out = tmp_path_factory.mktemp("et")
    fp32 = subprocess.Popen([sys.executable, "-c", _EXPORT_FP32, str(tiny_e2b), str(out / "fp32.edgekit"),
                             str(EXECUTORCH_CONTEXT), str(EXECUTORCH_VISION_BUDGET)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    e4b = run_cli("export", str(tiny_e4b), "--device", "android-flagship", "--context", str(EXECUTORCH_CONTEXT * 4),
                  "-o", str(out / "e4b.edgekit"), "--json", "--external-weights", timeout=1200)
    log = fp32.communicate(timeout=1200)[0]
    assert fp32.returncode == 0, f"fp32 export failed:\n{log[-4000:]}"
    assert e4b.returncode == 0, f"edgekit export failed:\n{e4b.stderr[-4000:]}"
    return {"fp32": load_bundle(out / "fp32.edgekit"), "e4b": load_bundle(out / "e4b.edgekit"),
            "e4b_summary": json.loads(e4b.stdout)}
