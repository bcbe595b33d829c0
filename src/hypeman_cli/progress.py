"""Progress on stderr only: a live line (spinner, bars) on a terminal, plain lines otherwise.

Nothing here ever writes to stdout, so piped output holds only the result; off a terminal rich
writes no colour or cursor codes and the live displays are replaced by one line per phase.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.status import Status

from hypeman_cli.units import human_bytes

stderr = Console(stderr=True, highlight=False)


def interactive() -> bool:
    return sys.stderr.isatty()


def note(text: str) -> None:
    """One informational line on stderr."""
    if interactive():
        stderr.print(escape(text))
    else:
        print(text, file=sys.stderr, flush=True)


class Phases:
    """The current step of a longer operation (pull -> create -> Initializing -> Running).

    On a terminal: one spinner line that changes text, and a check mark per finished step.
    Otherwise: each new text once, as a plain line on stderr. ``quiet`` shows nothing.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = interactive() and not quiet
        self._status: Status | None = None
        self._last = ""

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def update(self, text: str) -> None:
        if self.quiet or text == self._last:
            return
        self._last = text
        if self.live:
            if self._status is None:
                self._status = stderr.status(escape(text))
                self._status.start()
            else:
                self._status.update(escape(text))
        else:
            print(text, file=sys.stderr, flush=True)

    def done(self, text: str) -> None:
        if self.quiet:
            return
        self._last = ""
        if self.live:
            self._stop()
            stderr.print(f"[green]✓[/green] {escape(text)}")
        else:
            print(text, file=sys.stderr, flush=True)


class Transfer:
    """Bytes and speed of a copy or upload: a bar on a terminal, a summary line otherwise."""

    def __init__(self, label: str, total: int | None, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.completed = 0
        self.started = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if interactive() and not quiet:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=stderr, transient=False,
            )
            self._task = self._progress.add_task(escape(label), total=total)

    def __enter__(self) -> Transfer:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
        if exc is None and not self.quiet and self._progress is None:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            speed = human_bytes(int(self.completed / elapsed))
            print(f"{self.label}: {human_bytes(self.completed)} in {elapsed:.1f} s ({speed}/s)",
                  file=sys.stderr, flush=True)

    def describe(self, label: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=escape(label))

    def add_total(self, size: int) -> None:
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, total=(task.total or 0) + size)

    def advance_to(self, completed: int) -> None:
        self.completed = completed
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed)

    def advance(self, amount: int) -> None:
        self.advance_to(self.completed + amount)
