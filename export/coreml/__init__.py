"""Core ML bundles: Gemma 4 components as standalone ML programs (coremltools, iOS 18 / macOS 15)."""
