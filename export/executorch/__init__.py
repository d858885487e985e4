"""ExecuTorch exporter: a multi-method .pte for XNNPACK (Android), see exporter.py.

Importing this package does not import executorch; `exporter` does.
"""
