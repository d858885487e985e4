"""Every tensor a Gemma 4 checkpoint holds, from transformers' own module tree built on the
meta device (no weights allocated), so a checkpoint edgekit writes or reads has exactly
the names and shapes transformers loads. Needs torch + transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import require


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * 2  # bf16


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every persistent tensor of the model, in state-dict order, tied lm_head left out."""
    torch = require("torch", extra="export")
    transformers = require("transformers", extra="export")
    cfg = transformers.Gemma4Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return [TensorSpec(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]




def reference_model(path: Path, dtype: str = "float32"):
    """The transformers eager model, the numerical reference for every parity check."""
    torch = require("torch", extra="export")
    transformers = require("transformers", extra="export")
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        str(path), dtype=getattr(torch, dtype), local_files_only=True
    )
    return model.eval()
