"""Core ML bundles: standalone stateful ML programs (.mlpackage) and memory-mapped embedding tables."""
