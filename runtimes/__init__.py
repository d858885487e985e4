"""Device-side runner (no torch, no transformers): importable as edgekit.runtimes."""
