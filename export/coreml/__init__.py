"""Core ML (.mlpackage) tooling that runs on Linux: numpy evaluation of saved ML programs, torch op converters."""
