"""Reading an instance's log files: the last lines, then what is appended after them.

Everything here blocks on file I/O and knows nothing of HTTP: callers on the event loop run
:func:`open_log` and :meth:`LogFollower.read_new` in a worker thread (``asyncio.to_thread``).
Only :meth:`LogFollower.close` is safe to call from the loop, since it never waits.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TAIL_BLOCK_BYTES = 64 * 1024
# How far back from the end the tail may look: a file without newlines must not be read whole.
TAIL_SCAN_LIMIT_BYTES = 16 << 20
# A line longer than this is cut, so an endless line cannot fill memory.
MAX_LINE_BYTES = 1 << 20
# Bytes read per follow poll; a writer faster than that is caught up with over several polls.
FOLLOW_READ_BYTES = 1 << 20
_FOLLOW_READ_STEP = 256 * 1024


def decode_log_line(raw: bytes | bytearray) -> str:
    """One line without its newline. The serial console ends lines with CRLF; the CR goes too
    (as Go's line scanner, and so the original server, drops it)."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return bytes(raw).decode("utf-8", errors="replace")


class LineSplitter:
    """Cuts appended chunks into lines. A partial last line is held until its newline arrives
    (or until it grows past ``max_line_bytes``: then it is emitted in pieces)."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()

    @property
    def pending(self) -> bytes:
        return bytes(self._partial)

    def feed(self, data: bytes) -> list[str]:
        self._partial += data
        *complete, rest = self._partial.split(b"\n")
        lines = [decode_log_line(raw) for raw in complete]
        while len(rest) > self.max_line_bytes:
            lines.append(decode_log_line(rest[: self.max_line_bytes]))
            rest = rest[self.max_line_bytes :]
        self._partial = bytearray(rest)
        return lines


@dataclass(frozen=True)
class LogTail:
    lines: list[str]  # the last complete lines, at most the count asked for
    partial: bytes  # an unterminated last line ("" if the file ends with a newline)
    partial_offset: int  # where ``partial`` starts: following resumes there


def read_tail(
    file: BinaryIO,
    count: int,
    block_bytes: int = TAIL_BLOCK_BYTES,
    scan_limit: int = TAIL_SCAN_LIMIT_BYTES,
) -> LogTail:
    """The last ``count`` complete lines of a file, read backwards from its end in blocks, so a
    multi-GB log costs only its last few blocks. Blocking: call it in a worker thread."""
    size = os.fstat(file.fileno()).st_size
    blocks: list[bytes] = []
    start = size
    newlines = 0
    # count lines need count + 1 newlines: the one before the first line says where it starts.
    while start > 0 and size - start < scan_limit and newlines <= count:
        step = min(block_bytes, start, scan_limit - (size - start))
        start -= step
        file.seek(start)
        block = file.read(step)
        blocks.append(block)
        newlines += block.count(b"\n")
    blocks.reverse()
    data = b"".join(blocks)
    cut = data.rfind(b"\n") + 1  # just past the last complete line; 0 if there is none
    pieces = data[:cut].split(b"\n")[:-1] if cut else []
    if start > 0 and pieces:
        pieces = pieces[1:]  # the scan began inside a line: its first piece is not a whole line
    lines = [decode_log_line(raw) for raw in pieces[-count:]] if count else []
    return LogTail(lines=lines, partial=data[cut:], partial_offset=start + cut)


class LogFollower:
    """What is appended to a log file after an offset, across truncation (starts again at 0)
    and rotation (the old file is read to its end, then the new one from its start).

    ``read_new`` blocks (file I/O) and runs in a worker thread; ``close`` never blocks, so the
    event loop may call it even while a read is in progress (that read's thread then closes)."""

    def __init__(
        self,
        path: Path,
        file: BinaryIO,
        offset: int,
        read_limit: int = FOLLOW_READ_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.path = path
        self._file = file
        self._offset = offset
        self._read_limit = read_limit
        self._splitter = LineSplitter(max_line_bytes)
        self._lock = threading.Lock()
        self._close_requested = False
        self._closed = False

    @property
    def pending(self) -> bytes:
        return self._splitter.pending

    def read_new(self) -> list[str]:
        with self._lock:
            lines = [] if self._closed else self._read_locked()
        if self._close_requested:
            self._close_if_idle()
        return lines

    def close(self) -> None:
        # The flag is set before trying the lock: a reader that holds the lock now checks the
        # flag after releasing it, so one of the two closes the file.
        self._close_requested = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._closed = True
                    self._file.close()
            finally:
                self._lock.release()

    def _read_locked(self) -> list[str]:
        current = os.fstat(self._file.fileno())
        if current.st_size < self._offset:
            # Truncated in place (copytruncate): the writer goes on from the start. A held partial
            # line is kept: the writer's next bytes continue it.
            self._offset = 0
        elif current.st_size == self._offset and self._replaced(current):
            # Rotated, and the old file is read to its end: go on with the new one.
            try:
                successor = open(self.path, "rb", buffering=0)  # noqa: SIM115 - owned by self
            except FileNotFoundError:
                return []
            self._file.close()
            self._file = successor
            self._offset = 0
        return self._drain()

    def _replaced(self, current: os.stat_result) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away and no successor yet: the old file may still grow
        return (named.st_ino, named.st_dev) != (current.st_ino, current.st_dev)

    def _drain(self) -> list[str]:
        lines: list[str] = []
        budget = self._read_limit
        while budget > 0:
            chunk = os.pread(self._file.fileno(), min(budget, _FOLLOW_READ_STEP), self._offset)
            if not chunk:
                break
            self._offset += len(chunk)
            budget -= len(chunk)
            lines += self._splitter.feed(chunk)
        return lines


def open_log(path: Path, tail: int, follow: bool) -> tuple[list[str], LogFollower | None]:
    """The last ``tail`` lines and, when following, a follower positioned after them. Blocking.
    Raises FileNotFoundError if the log has not been written yet."""
    file = open(path, "rb", buffering=0)  # noqa: SIM115 - handed to the follower or closed here
    try:
        found = read_tail(file, tail)
    except BaseException:
        file.close()
        raise
    if follow:
        # The follower starts at the partial last line, which it emits once it is complete.
        return found.lines, LogFollower(path, file, found.partial_offset)
    file.close()
    lines = found.lines
    if found.partial and tail:
        lines = [*lines, decode_log_line(found.partial)][-tail:]
    return lines, None
