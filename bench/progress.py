"""Progress display: rich bars on a terminal, plain lines in a log, silence in tests (``quiet=True``).

On a terminal a bar is live while its work runs and cleared when it ends (finished bars do not pile
up), under one overall "cell k of n" line. In a log (not a TTY) there are no bars: one line per
finished cell (``Reporter.cell_done``), and a bar's notes at most one line per phase (a training
bar: one per epoch).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _phase(text: str) -> str | None:
    """What a note is about: the words before its first colon ("epoch 3"), None for none."""
    head, sep, _ = text.partition(":")
    return head.strip() if sep else None


class Bar:
    def __init__(self, progress: Progress | None, task: int | None, log: Console | None = None, label: str = ""):
        self._progress, self._task, self._log, self._label = progress, task, log, label
        self._pending: str | None = None  # log mode: the latest note of the current phase, not printed yet
        self._printed = 0

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        """A status line: shown beside the bar on a terminal; in a log, one line per phase (the
        phase's last note), a note without a phase joined to the line of the phase it ends."""
        if self._progress is not None:
            self._progress.update(self._task, info=escape(text))  # the column renders markup
        if self._log is None:
            return
        if self._pending is not None and _phase(text) is None:
            self._pending = f"{self._pending}; {text}"
            return
        if self._pending is not None and _phase(text) != _phase(self._pending):
            self._flush()
        self._pending = text

    def _flush(self) -> None:
        if self._log is not None and self._pending is not None:
            line = f"{self._label}: {self._pending}" if self._printed == 0 else f"  {self._pending}"
            self._log.print(line, highlight=False, markup=False, soft_wrap=True)
            self._printed += 1
        self._pending = None

    def close(self) -> None:
        """End the bar at the count it reached (a timing bar stops on time, before its maximum)."""
        self._flush()
        if self._progress is not None:
            done = self._progress.tasks[self._task].completed
            self._progress.update(self._task, total=max(done, 1), completed=max(done, 1))


class Reporter:
    """Owns the console; hands out progress bars for training, evaluation and timing, and says
    which cell of the run is being measured."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.cells: tuple[int, int] | None = None  # (cell being measured, cells planned)

    def print(self, *args, **kwargs) -> None:
        if not self.quiet:
            kwargs.setdefault("soft_wrap", not self.console.is_terminal)  # a log line stays one line
            self.console.print(*args, **kwargs)

    def cell_started(self, number: int, total: int) -> None:
        self.cells = (number, total)

    def cell_done(self, line: str) -> None:
        """One plain line per finished cell, on a terminal and in a log alike."""
        if self.cells is not None:
            k, n = self.cells
            self.print(f"cell {k}/{n} {line}", markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Bar]:
        if self.quiet or not self.console.is_terminal:  # a log gets no bars, only the notes
            bar = Bar(None, None, None if self.quiet else self.console, description)
            yield bar
            bar.close()
            return
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,  # cleared when done: the per-cell line (cell_done) stays instead
        )
        with progress:
            if self.cells is not None:
                k, n = self.cells
                progress.add_task(f"cell {k} of {n}", total=n, completed=k - 1, info="")
            task = progress.add_task(escape(description), total=total, info="")
            bar = Bar(progress, task, self.console, description)  # notes print above the live bars
            try:
                yield bar
            finally:
                bar.close()


QUIET = Reporter(quiet=True)
