"""A build's log and its event stream (``GET /builds/{id}/events``).

The log file (``builds/<id>/logs/build.log``) is the record of what the build printed; the
stream replays it, then follows. The two never overlap or miss a line: a follower subscribes
and takes the log's committed length in one step of the event loop, replays the file up to that
length, and then gets, in order, what was appended after it. Appends are written off the event
loop and committed (length moved, followers told) back on it, in the order they were made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from hypemand.builds.models import BuildEvent, BuildEventType, BuildStatus

HEARTBEAT_SECONDS = 30.0
MAX_LINE = 64 << 10  # a longer line is cut into pieces of this size


def now() -> datetime:
    return datetime.now(UTC)


class BuildLog:
    """One build's log: appends go to the file, then to every follower, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.committed = path.stat().st_size if path.exists() else 0
        self._followers: set[asyncio.Queue[BuildEvent]] = set()
        self._write_lock = asyncio.Lock()
        self._partial = b""

    async def append(self, data: bytes) -> None:
        if not data:
            return
        async with self._write_lock:  # one writer at a time keeps the file in call order
            await asyncio.to_thread(_append, self.path, data)
            self.committed += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            if len(self._partial) > MAX_LINE:
                lines.append(self._partial)
                self._partial = b""
            for line in lines:
                self._publish(BuildEvent(timestamp=now(), type=BuildEventType.LOG,
                                         content=line.decode(errors="replace")))

    def status(self, status: BuildStatus) -> None:
        if status.finished and self._partial:  # the last line, though no newline ended it
            self._publish(BuildEvent(timestamp=now(), type=BuildEventType.LOG,
                                     content=self._partial.decode(errors="replace")))
            self._partial = b""
        self._publish(BuildEvent(timestamp=now(), type=BuildEventType.STATUS, status=status))

    def _publish(self, event: BuildEvent) -> None:
        for queue in self._followers:
            queue.put_nowait(event)

    @contextlib.contextmanager
    def follow(self) -> Iterator[tuple[asyncio.Queue[BuildEvent], int]]:
        queue: asyncio.Queue[BuildEvent] = asyncio.Queue()
        self._followers.add(queue)
        try:
            # A line still being written is not replayed: the follower gets it whole when it ends.
            yield queue, self.committed - len(self._partial)
        finally:
            self._followers.discard(queue)

    async def replay(self, length: int) -> list[BuildEvent]:
        data = await asyncio.to_thread(_read_prefix, self.path, length)
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        stamp = now()
        return [BuildEvent(timestamp=stamp, type=BuildEventType.LOG, content=line.decode(errors="replace"))
                for line in lines]



async def stream(log: BuildLog, current_status: Callable[[], BuildStatus], follow: bool,
                 heartbeat: float = HEARTBEAT_SECONDS) -> AsyncIterator[BuildEvent]:
    """The log so far, the status now, then (``follow``) what comes until the build ends."""
    with log.follow() as (queue, length):
        for event in await log.replay(length):
            yield event
        status = current_status()
        yield BuildEvent(timestamp=now(), type=BuildEventType.STATUS, status=status)
        if not follow or status.finished:
            return
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), heartbeat)
            except TimeoutError:
                yield BuildEvent(timestamp=now(), type=BuildEventType.HEARTBEAT)
                continue
            yield event
            if event.type is BuildEventType.STATUS and event.status is not None and event.status.finished:
                return


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write(data)


def _read_prefix(path: Path, length: int) -> bytes:
    if length <= 0:
        return b""
    with path.open("rb") as handle:
        return handle.read(length)
