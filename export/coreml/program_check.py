"""`edgekit verify` for Core ML bundles off Apple hardware: the runtime backend, with every program
evaluated op by op in numpy (mil_eval.py) instead of run by Core ML.

It is a checking tool, not a runtime: the same host code as on a device (row lookups,
padding, prefill / decode, the state threaded through), only the programs' arithmetic is
numpy's, in the programs' own dtypes. On macOS verify runs them on Core ML itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.bundle import Bundle
from edgekit.errors import BundleError
from edgekit.export.coreml.mil_eval import SavedProgram
from edgekit.runtimes.backends.coreml_backend import CoreMLBackend


class EvaluatedPrograms:
    """An .mlpackage's functions evaluated in numpy; a state is a dict of arrays updated in place."""

    def __init__(self, path: Path, functions: tuple[str, ...]) -> None:
        self._program = SavedProgram(path)
        missing = set(functions) - set(self._program.function_names)
        if missing:
            raise BundleError(f"{path.name} has no function {', '.join(sorted(missing))} (the manifest names it)")

    def run(self, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        return self._program.run(function, inputs, state)

    def new_state(self, function: str) -> dict[str, np.ndarray]:
        return self._program.new_states(function)


def backend_for_verify(bundle: Bundle, *, providers: tuple[str, ...] | None = None,
                       threads: int | None = None) -> CoreMLBackend:
    if sys.platform == "darwin":
        return CoreMLBackend(bundle)
    return CoreMLBackend(bundle, programs=EvaluatedPrograms)
