"""The exports tests/test_plan_vs_bundle.py weighs: every (format, backend, recipe) that an
exporter writes, from one checkpoint, each planned the way `edgekit export` plans it.

They run in background processes started with the test session (tests/conftest.py
plan_size_exports, `python -m tests.plan_sizes CHECKPOINT OUT CASE...`): an ExecuTorch
export costs ~20 s of CPU whatever the model's depth (lowering's graph passes), an ONNX one
~6 s, so the suite's other tests run meanwhile.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from edgekit.formats import FORMATS
from edgekit.plan import ExportPlan, make_plan
from edgekit.profiles import load_profiles

# One layer (a second one costs export time, not coverage), with widths where every kind of
# weight a recipe treats apart is a sixth to a third of the parameters, so that one kind
# stored at twice its planned bits moves the total past the bound: decoder linears 8.5 M,
# per-layer table 8.4 M (E2B's largest weight too), token table 4.2 M, tied lm_head 4.2 M.
CONTEXT = 64
# Which profile plans each (format, backend): the device whose export takes that path.
PROFILES = {("onnx", "cpu"): "pi5-8gb", ("executorch", "xnnpack"): "android-flagship",
            ("coreml", "coreml"): "iphone-15-pro"}
# The files that hold weights; tokenizer files, manifest and genai_config are not planned.
WEIGHT_FILES = {"onnx": (".onnx", ".onnx.data"), "executorch": (".pte", ".ptd"),
                "coreml": ("weight.bin", "embedding.bin")}  # the programs' weights, the row files


@dataclass(frozen=True)
class Case:
    format: str
    backend: str
    recipe: str

    @property
    def id(self) -> str:
        return f"{self.format}-{self.backend}-{self.recipe}"


# Each Core ML case costs two decoder conversions (~40 s of CPU). The recipes differ in the
# bits coremltools and the row files are given: fp32 (float32 programs and rows) and the
# iPhone's int4-ple2 (4-bit blocks, 2-bit rows, fp16 scales) bound the others (int4-ple2-t8
# differs in the towers, which this checkpoint has none of); int8-channel is the one
# scale-per-row layout (tests/test_coreml_export.py verifies it too).
COREML_RECIPES = ("fp32", "int4-ple2", "int8-channel")


def cases() -> list[Case]:
    """Every recipe of every format with an exporter (Core ML: COREML_RECIPES), on the first
    backend: a format's backends differ in execution providers only, which the files do not
    carry."""
    found = []
    for fmt in FORMATS:
        backend = fmt.backends[0].name
        recipes = [r for r in fmt.recipes_for(backend) if fmt.name != "coreml" or r in COREML_RECIPES]
        found += [Case(fmt.name, backend, r) for r in recipes]
    return found


def make(path: Path) -> Path:
    from edgekit.testing.checkpoint_writer import make_checkpoint
    from edgekit.models.gemma4.presets import PRESETS, Preset, TextShape

    shape = TextShape(hidden_size=512, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=64, global_head_dim=128, hidden_size_per_layer_input=1024,
                      num_kv_shared_layers=0, sliding_every=5, sliding_window=64, use_double_wide_mlp=False,
                      vocab_size=8192, max_position_embeddings=4096)
    tiny = PRESETS["tiny-e2b"]
    return make_checkpoint(Preset("plan-sizes", "plan accuracy", shape, tiny.audio, tiny.vision), path,
                           audio=False, vision=False)


def plan_for(checkpoint: Path, case: Case) -> ExportPlan:
    return make_plan(checkpoint, profile=load_profiles().get(PROFILES[case.format, case.backend]),
                     format_name=case.format, recipe_name=case.recipe, modalities="text", context=CONTEXT)


def bundle_path(out: Path, case: Case) -> Path:
    return out / f"{case.id}.edgekit"


def error_path(out: Path, case: Case) -> Path:
    return out / f"{case.id}.error"


def main(checkpoint: Path, out: Path, ids: list[str]) -> None:
    """Export each case; one that fails leaves its traceback beside the others' bundles."""
    from edgekit.export import exporter_for
    from edgekit.checkpoint import load

    by_id = {c.id: c for c in cases()}
    out.mkdir(parents=True, exist_ok=True)
    for case in (by_id[i] for i in ids):
        try:
            exporter_for(case.format)(load(checkpoint), plan=plan_for(checkpoint, case),
                                      output=bundle_path(out, case))
        except Exception:
            error_path(out, case).write_text(traceback.format_exc())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
