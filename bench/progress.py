"""Progress display: rich bars on a terminal, silence in tests (``quiet=True``)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    def __init__(self, progress: Progress | None, task: int | None, log: Console | None = None, label: str = ""):
        self._progress, self._task, self._log, self._label = progress, task, log, label

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        """A status line: shown beside the bar on a terminal, printed as a log line otherwise."""
        if self._progress is not None:
            self._progress.update(self._task, info=escape(text))  # the column renders markup
        if self._log is not None:
            self._log.print(f"{self._label}: {text}", highlight=False, markup=False)


class Reporter:
    """Owns the console; hands out progress bars for training, evaluation and timing."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    def print(self, *args, **kwargs) -> None:
        if not self.quiet:
            self.console.print(*args, **kwargs)

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Bar]:
        if self.quiet:
            yield Bar(None, None)
            return
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        log = None if self.console.is_terminal else self.console  # no live bars in a log file
        with progress:
            task = progress.add_task(escape(description), total=total, info="")
            yield Bar(progress, task, log, description)


QUIET = Reporter(quiet=True)
