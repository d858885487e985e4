"""Progress for steps that can take more than a couple of seconds, on stderr.

On a terminal: a rich bar per step. Elsewhere (CI logs, pipes, systemd), one line per
stage with the time elapsed, so a long export is never silent:

    edgekit: [   0.0 s] Exporting ONNX graphs
    edgekit: [  12.4 s] Tracing text_decoder
    edgekit: [  61.9 s] Exporting ONNX graphs: done

Stage lines start with "edgekit: [" and an error line with "edgekit: error:", so a
script can tell them apart. EDGEKIT_PROGRESS=0 turns both off, =1 forces the bar.
stdout is never used, so `--json` output stays machine-readable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Iterator, Literal, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

T = TypeVar("T")
STAGE_PREFIX = "edgekit: ["

_console = Console(stderr=True)


def _mode() -> Literal["bar", "lines", "off"]:
    setting = os.environ.get("EDGEKIT_PROGRESS")
    if setting == "0":
        return "off"
    return "bar" if setting == "1" or sys.stderr.isatty() else "lines"


@contextlib.contextmanager
def progress_bar(description: str, total: float | None) -> Iterator["Advance"]:
    """Yield a callable that advances the step; `total=None` gives a spinner."""
    mode = _mode()
    if mode == "off":
        yield Advance()
        return
    if mode == "lines":
        lines = StageLines(description)
        yield Advance(lines=lines)
        lines.done()
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=_console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield Advance(progress, task)


class StageLines:
    """One stderr line per stage: when the step starts, when its description changes, when it ends."""

    def __init__(self, description: str) -> None:
        self.started = time.monotonic()
        self.title = self.current = description
        self._print(description)

    def _print(self, text: str) -> None:
        print(f"{STAGE_PREFIX}{time.monotonic() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    def stage(self, description: str) -> None:
        if description != self.current:
            self.current = description
            self._print(description)

    def done(self) -> None:
        self._print(f"{self.title}: done")


class Advance:
    def __init__(self, progress: Progress | None = None, task: int | None = None, *,
                 lines: StageLines | None = None) -> None:
        self._progress, self._task, self._lines = progress, task, lines

    def __call__(self, amount: float = 1.0, *, description: str | None = None) -> None:
        if self._lines is not None and description:
            self._lines.stage(description)
        if self._progress is not None and self._task is not None:
            kwargs = {"description": description} if description else {}
            self._progress.update(self._task, advance=amount, **kwargs)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a bar: `for x in track(xs, "Writing shards"): ...`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(description, total) as advance:
        for item in items:
            yield item
            advance()
