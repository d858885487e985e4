"""The .pte through ExecuTorch's C++ runtime, as an app runs it.

bench/et_decode (built with the CMake package the executorch wheel ships: its libexecutorch,
XNNPACK backend, optimized and quantized kernels) must load the test bundles with no Python
and decode the same greedy tokens, from the same logits, as the Python runtime: an app's
runtime has no operator the Python bindings would have supplied.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from edgekit.manifest import METHOD_TEXT_DECODER
from tests.test_executorch_export import Session, _greedy, _program

pytest.importorskip("executorch.runtime")
REPO = Path(__file__).resolve().parents[1]
STEPS = 16


def _et_cpp():
    spec = importlib.util.spec_from_file_location("et_cpp", REPO / "bench" / "et_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def et_cpp():
    return _et_cpp()


@pytest.fixture(scope="module")
def et_decode(et_cpp, tmp_path_factory) -> Path:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing and not os.environ.get("CI"):  # .ci/run installs them: there the test must run
        pytest.skip(f"building et_decode needs {', '.join(missing)}")
    return et_cpp.build(tmp_path_factory.mktemp("et_decode"))


@pytest.mark.parametrize("name", ["fp32", "e4b"])
def test_cpp_runtime_decodes_what_the_python_runtime_decodes(executorch_bundles, et_cpp, et_decode, name):
    """fp32: tiny-e2b, every method; e4b: tiny-e4b 8da4w-emb4 with its weights in a .ptd."""
    bundle = executorch_bundles[name]
    vocab = bundle.manifest.method(METHOD_TEXT_DECODER).outputs[0].shape[-1]
    prompt = torch.randint(10, vocab, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    assert (name == "e4b") == bool(bundle.manifest.extra.get("program_data"))  # the .ptd is exercised
    got = et_cpp.run_bundle(et_decode, bundle.path, prompt, steps=STEPS, repeats=2)

    tokens, logits = _greedy(Session(_program(bundle)), prompt, STEPS)
    assert got["tokens"] == tokens
    top = torch.topk(logits[0], 5)
    assert [token for token, _ in got["prefill_top"]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([value for _, value in got["prefill_top"]]), top.values,
                               rtol=1e-4, atol=1e-4)
    # What the benchmark reads: a decode peak measured after load, and the program mapped.
    assert 0 < got["decode_peak_rss_bytes"] <= got["life_peak_rss_bytes"]
    assert got["status_after_load"]["RssAnon"] > got["status_before_load"]["RssAnon"]

    # --lean-memory (planned memory in the app's own anonymous mappings, tables random-access)
    # computes the same thing.
    lean = et_cpp.run_bundle(et_decode, bundle.path, prompt, steps=STEPS, repeats=1, lean_memory=True)
    assert lean["tokens"] == tokens
    assert lean["prefill_top"] == got["prefill_top"]


def test_cpp_runtime_reports_a_missing_program(et_cpp, et_decode, tmp_path):
    with pytest.raises(RuntimeError, match="et_decode exited 1"):
        et_cpp.run(et_decode, tmp_path / "absent.pte", [1, 2, 3], steps=2, repeats=1)
