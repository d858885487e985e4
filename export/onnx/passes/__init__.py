"""ONNX graph passes, one per file (`<verb>_<noun>_pass.py`)."""
