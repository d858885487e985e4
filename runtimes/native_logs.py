"""Native libraries' logs on file descriptor 2, hidden while the CLI asks for it."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def native_logs_hidden() -> Iterator[None]:
    """Silence file descriptor 2 while native code runs, when the CLI asks (EDGEKIT_NATIVE_LOGS=hide;
    `--debug` leaves it): XNNPACK's first load logs a page of CPU probing from C++, and
    ExecuTorch's LLM custom ops log a line per eager call (the exporter's sample forward),
    which would bury the CLI's one-line messages. Failures still raise."""
    if os.environ.get("EDGEKIT_NATIVE_LOGS") != "hide":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
