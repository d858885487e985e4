"""Progress bars for steps that can take more than a couple of seconds.

Bars go to stderr, so `--json` output on stdout stays machine-readable, and they are
silent when stderr is not a terminal (CI logs, pipes) unless EDGEKIT_PROGRESS=1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

T = TypeVar("T")

_console = Console(stderr=True)


def _enabled() -> bool:
    return sys.stderr.isatty() or os.environ.get("EDGEKIT_PROGRESS") == "1"


@contextlib.contextmanager
def progress_bar(description: str, total: float | None) -> Iterator["Advance"]:
    """Yield a callable that advances the bar; `total=None` gives a spinner."""
    if not _enabled():
        yield Advance(None, None)
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=_console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield Advance(progress, task)


class Advance:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def __call__(self, amount: float = 1.0, *, description: str | None = None) -> None:
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
