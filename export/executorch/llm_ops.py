"""ExecuTorch's LLM custom operators (llama::update_cache, llama::custom_sdpa) for tracing.

The executorch wheel ships them as an ahead-of-time library whose Python module registers
the shapes torch.export needs; importing it also registers their kernels with the
ExecuTorch runtime in this process. ExecuTorch's stock LLM runners link the same kernels.
"""

from __future__ import annotations

from edgekit.errors import ExportError


def load_llm_ops() -> None:
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except (ImportError, OSError, AssertionError) as exc:
        raise ExportError(f"ExecuTorch's LLM custom ops are not available: {exc}") from None
