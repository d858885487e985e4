"""Device-side runner (no torch, no transformers): importable as edgekit.runtimes.

    engine = edgekit.runtimes.load("gemma-e2b-pi5-8gb.edgekit")
    for piece in engine.generate([{"role": "user", "content": "Hi"}]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from typing import Any


def load(path, **options: Any):
    """Open a bundle for generation (see edgekit.runtimes.engine.Engine)."""
    from edgekit.runtimes.engine import Engine

    return Engine.open(path, **options)
