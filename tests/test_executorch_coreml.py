"""Core ML ahead-of-time lowering on Linux: a 2-layer tiny text_decoder becomes one CoreMLBackend
delegate with its KV caches as Core ML states (running it needs Apple's Core ML runtime), and
`edgekit export --device iphone-15-pro --format executorch` puts the text methods on it.

Lowering takes ~15 s (the CLI export ~1 min); skipped where coremltools is missing.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

from edgekit.errors import ExportError, MissingDependencyError
from edgekit.export.executorch.coreml import coreml_partitioner

MAX_SEQ_LEN = 8
CONTEXT = 32


def test_missing_coremltools_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(MissingDependencyError, match=r"coremltools is not installed.*edgekit\[export\]"):
        coreml_partitioner()


def test_target_without_states_is_refused():
    with pytest.raises(ExportError, match="Core ML states"):
        coreml_partitioner(ios_target="17")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    pytest.importorskip("coremltools")
    pytest.importorskip("executorch.backends.apple.coreml.partition")
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.export.executorch.methods import text_decoder
    from edgekit.checkpoint import load
    from edgekit.models.gemma4.presets import PRESETS

    root = tmp_path_factory.mktemp("coreml")
    ckpt = make_checkpoint(PRESETS["tiny-e2b"], root / "ckpt", layers=2, audio=False, vision=False)
    build = text_decoder(load(ckpt).reference_model(), max_context=CONTEXT, max_seq_len=MAX_SEQ_LEN)
    build.module.decoder.reset_cache()
    with torch.no_grad():  # no xnnpack_modules swap: Core ML takes Gemma4RMSNorm as it is
        ep = torch.export.export(build.module, build.example_inputs, dynamic_shapes=build.dynamic_shapes,
                                 strict=True)
    edge = to_edge_transform_and_lower(
        {build.name: ep}, partitioner={build.name: [coreml_partitioner(range_constraints=ep.range_constraints)]},
        compile_config=EdgeCompileConfig(_check_ir_validity=False))
    program = edge.to_executorch()
    out = root / "model.pte"
    with open(out, "wb") as fh:
        program.write_to_file(fh)
    return build.name, edge.exported_program(build.name), out


def test_text_decoder_is_one_coreml_delegate(lowered):
    from executorch.exir._serialize._program import deserialize_pte_binary

    name, program, out = lowered
    assert out.stat().st_size > 0
    plans = deserialize_pte_binary(out.read_bytes()).program.execution_plan
    assert {plan.name: [d.id for d in plan.delegates] for plan in plans} == {name: ["CoreMLBackend"]}
    left = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert left <= {"executorch_call_delegate", "<built-in function getitem>"}, left
    assert not program.graph_signature.buffers_to_mutate  # the caches went into Core ML


def test_coreml_model_takes_one_token_and_keeps_the_caches(lowered):
    import coremltools as ct
    from executorch.backends.apple.coreml import executorchcoreml
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    _, program, _ = lowered
    [module] = [m for _, m in program.graph_module.named_modules() if isinstance(m, LoweredBackendModule)]
    with tempfile.TemporaryDirectory() as tmp:
        assert executorchcoreml.unflatten_directory_contents(module.processed_bytes, tmp)
        spec = ct.models.MLModel(os.path.join(tmp, "lowered_module", "model.mlpackage"),
                                 skip_model_load=True).get_spec()
    ranges = {i.name: [(r.lowerBound, r.upperBound) for r in i.type.multiArrayType.shapeRange.sizeRanges]
              for i in spec.description.input}
    assert ranges["cache_position"] == [(1, MAX_SEQ_LEN)]  # decode (S = 1) must be accepted
    assert ranges["embeds"][1] == (1, MAX_SEQ_LEN)
    assert len(spec.description.state) == 4  # K and V of the sliding and the global layer


@pytest.mark.slow
def test_iphone_profile_puts_the_text_methods_on_core_ml(iphone_bundle):
    """tests/conftest.py iphone_bundle: `edgekit export --device iphone-15-pro --format executorch`."""
    from edgekit.bundle import load_bundle
    from edgekit.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING

    path, stderr = iphone_bundle
    from edgekit.progress import STAGE_PREFIX

    # coremltools' and ExecuTorch's chatter stays hidden: only edgekit's own stage lines
    assert [line for line in stderr.splitlines() if not line.startswith(STAGE_PREFIX)] == []
    assert "Lowering to coreml" in stderr
    m = load_bundle(path).manifest
    assert (m.format, m.backend, m.recipe) == ("executorch", "coreml", "fp16")
    for name in (METHOD_TOKEN_EMBEDDING, METHOD_TEXT_DECODER):
        assert m.method(name).extra["delegates"] == {"CoreMLBackend": 1} and not m.method(name).extra["kernels"]
    assert m.extra["kv_cache_dtype"] == "float16"


@pytest.mark.slow
def test_core_ml_bundle_says_where_it_runs(iphone_bundle):
    from tests.conftest import assert_clean_failure, run_cli

    path, _ = iphone_bundle
    assert_clean_failure(run_cli("run", str(path), "-p", "hi"), code=69, contains="only Apple devices")


def test_core_ml_backend_takes_only_float_recipes(tiny_e2b, tmp_path):
    from tests.conftest import assert_clean_failure, run_cli

    result = run_cli("export", str(tiny_e2b), "--device", "iphone-15-pro", "--format", "executorch",
                     "--quant", "8da4w", "-o", str(tmp_path / "x.edgekit"))
    assert_clean_failure(result, code=2, contains="backend 'coreml'; choose one of: fp16, fp32")
    assert not (tmp_path / "x.edgekit").exists()
