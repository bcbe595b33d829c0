"""A build's log and its event stream (``GET /builds/{id}/events``).

The log file (``builds/<id>/logs/build.log``) is the record of what the build printed; the
stream replays it, then follows. The two never overlap or miss a line: a follower subscribes
and takes the log's committed length in one step of the event loop, replays the file up to that
length, and then gets, in order, what was appended after it. Appends are written off the event
loop and committed (length moved, followers told) back on it, in the order they were made.

Both are bounded, whatever a build prints:

* the file keeps :data:`MAX_LOG_BYTES` of output; the append that would pass it writes what fits,
  then the line :data:`TRUNCATED_LINE`, and everything after is dropped;
* a line is an event of at most :data:`MAX_LINE` bytes: a longer one is cut into pieces of that
  size, counted from the line's start, live and in the replay alike (so they agree);
* a follower's backlog is bounded (:data:`MAX_FOLLOWER_EVENTS`, :data:`MAX_FOLLOWER_BYTES`): one
  that falls that far behind is dropped and its stream ends; the client reconnects and replays
  the file instead of the server holding every line for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from hypemand.builds.models import BuildEvent, BuildEventType, BuildStatus

HEARTBEAT_SECONDS = 30.0
MAX_LINE = 64 << 10  # a longer line is cut into pieces of this size
MAX_LOG_BYTES = 64 << 20  # of a build's output kept in its log file
TRUNCATED_LINE = f"==> the log is truncated here ({MAX_LOG_BYTES >> 20} MiB)"
# A follower's backlog: past either bound it is dropped (its stream ends) rather than queued for.
MAX_FOLLOWER_EVENTS = 10_000
MAX_FOLLOWER_BYTES = 16 << 20  # of log content (characters, as decoded)
# What is cut into lines (or read back for a replay) at a time: bounds the copies of one append.
WINDOW_BYTES = 1 << 20


def now() -> datetime:
    return datetime.now(UTC)


def _log_event(line: bytes) -> BuildEvent:
    return BuildEvent(timestamp=now(), type=BuildEventType.LOG, content=line.decode(errors="replace"))


class LineCutter:
    """Bytes into lines (without their newline) of at most :data:`MAX_LINE` bytes; ``partial``
    is the line not yet ended, never longer than :data:`MAX_LINE` (a longer one has given its
    first pieces already). Empty ``partial`` means the next byte starts a line."""

    def __init__(self) -> None:
        self.partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        text = self.partial + data
        lines: list[bytes] = []
        start = 0
        while (end := text.find(b"\n", start)) >= 0:
            if end == start:
                lines.append(b"")
            lines.extend(text[piece:min(piece + MAX_LINE, end)] for piece in range(start, end, MAX_LINE))
            start = end + 1
        while len(text) - start > MAX_LINE:  # strictly: a line of exactly MAX_LINE stays one piece
            lines.append(text[start:start + MAX_LINE])
            start += MAX_LINE
        self.partial = text[start:]
        return lines

    def skip(self, data: bytes) -> None:
        """What :meth:`feed` would leave in ``partial``, without making the lines (nobody reads them)."""
        newline = data.rfind(b"\n")
        if newline >= 0:
            length, head, tail = len(data) - newline - 1, b"", data[newline + 1:]
        else:
            length, head, tail = len(self.partial) + len(data), self.partial, data
        if length > MAX_LINE:  # the pieces given out leave the last 1..MAX_LINE bytes
            keep = (length - 1) % MAX_LINE + 1
            head, tail = (b"", tail[-keep:]) if keep <= len(tail) else (head[-(keep - len(tail)):], tail)
        self.partial = head + tail


class Follower:
    """One stream's queue of events still to send; ``None`` in it ends the stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[BuildEvent | None] = asyncio.Queue()
        self.queued_bytes = 0

    def offer(self, event: BuildEvent) -> bool:
        """Queue ``event``; False (nothing queued) when that would pass a bound."""
        size = len(event.content or "")
        if self.queue.qsize() >= MAX_FOLLOWER_EVENTS or self.queued_bytes + size > MAX_FOLLOWER_BYTES:
            return False
        self.queue.put_nowait(event)
        self.queued_bytes += size
        return True

    def end(self) -> None:
        """Drop the backlog (its memory is what this is for) and end the stream."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queued_bytes = 0
        self.queue.put_nowait(None)

    async def next(self) -> BuildEvent | None:
        event = await self.queue.get()
        if event is not None:
            self.queued_bytes -= len(event.content or "")
        return event


class BuildLog:
    """One build's log: appends go to the file, then to every follower, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.committed = path.stat().st_size if path.exists() else 0
        # Past the cap only by the truncation line: a log found so was truncated already.
        self.truncated = self.committed > MAX_LOG_BYTES
        self._followers: set[Follower] = set()
        self._write_lock = asyncio.Lock()
        self._lines = LineCutter()

    async def append(self, data: bytes) -> None:
        if not data or self.truncated:
            return
        async with self._write_lock:  # one writer at a time keeps the file in call order
            if self.truncated:
                return
            room = max(0, MAX_LOG_BYTES - self.committed)
            kept = memoryview(data)[:room]  # no copy of what may be a very large chunk
            tail = b""
            if len(kept) < len(data):
                line_open = kept[-1:].tobytes() != b"\n" if kept else bool(self._lines.partial)
                tail = (b"\n" if line_open else b"") + TRUNCATED_LINE.encode() + b"\n"
            await asyncio.to_thread(_append, self.path, kept, tail)
            self.committed += len(kept) + len(tail)
            self.truncated = bool(tail)
            for start in range(0, len(kept), WINDOW_BYTES):
                window = bytes(kept[start:start + WINDOW_BYTES])
                if self._followers:
                    self._publish_lines(window)
                else:
                    self._lines.skip(window)
            self._publish_lines(tail)  # ends the open line, if any, then the truncation line

    def _publish_lines(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            self._publish(_log_event(line))

    def status(self, status: BuildStatus) -> None:
        if status.finished and self._lines.partial:  # the last line, though no newline ended it
            self._publish(_log_event(self._lines.partial))
            self._lines.partial = b""
        self._publish(BuildEvent(timestamp=now(), type=BuildEventType.STATUS, status=status))

    def _publish(self, event: BuildEvent) -> None:
        for follower in list(self._followers):
            if not follower.offer(event):
                self._followers.discard(follower)
                follower.end()

    @contextlib.contextmanager
    def follow(self) -> Iterator[tuple[Follower, int]]:
        follower = Follower()
        self._followers.add(follower)
        try:
            # A line still being written is not replayed: the follower gets it whole when it ends.
            yield follower, self.committed - len(self._lines.partial)
        finally:
            self._followers.discard(follower)

    async def replay(self, length: int) -> AsyncIterator[BuildEvent]:
        """The file's first ``length`` bytes as events, read a window at a time."""
        lines = LineCutter()
        for offset in range(0, max(length, 0), WINDOW_BYTES):
            data = await asyncio.to_thread(_read_range, self.path, offset, min(WINDOW_BYTES, length - offset))
            for line in lines.feed(data):
                yield _log_event(line)
        if lines.partial:
            yield _log_event(lines.partial)


async def stream(log: BuildLog, current_status: Callable[[], BuildStatus], follow: bool,
                 heartbeat: float = HEARTBEAT_SECONDS) -> AsyncGenerator[BuildEvent, None]:
    """The log so far, the status now, then (``follow``) what comes until the build ends, or
    until this stream fell too far behind (it just ends: the client may connect again)."""
    with log.follow() as (follower, length):
        async for event in log.replay(length):
            yield event
        status = current_status()
        yield BuildEvent(timestamp=now(), type=BuildEventType.STATUS, status=status)
        if not follow or status.finished:
            return
        while True:
            try:
                event_or_end = await asyncio.wait_for(follower.next(), heartbeat)
            except TimeoutError:
                yield BuildEvent(timestamp=now(), type=BuildEventType.HEARTBEAT)
                continue
            if event_or_end is None:
                return
            yield event_or_end
            if (event_or_end.type is BuildEventType.STATUS and event_or_end.status is not None
                    and event_or_end.status.finished):
                return


def _append(path: Path, data: memoryview, tail: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write(data)
        handle.write(tail)


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)
