"""What an ONNX bundle's files say about it, checked against its manifest on load."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import BundleError
from edgekit.manifest import Manifest


def check_exported_files(root: Path, manifest: Manifest) -> tuple[int, str] | None:
    """(the context the decoder was exported for, where that is written), from genai_config.json."""
    name = manifest.extra.get("genai_config")
    if not name:
        return None
    try:
        data = json.loads((root / name).read_text(encoding="utf-8"))
        context = data["model"]["context_length"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        raise BundleError(f"bundle file {name} is not an onnxruntime-genai config with model.context_length") from None
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise BundleError(f"bundle file {name} has an invalid model.context_length {context!r:.40}")
    return context, f"{name} model.context_length"
