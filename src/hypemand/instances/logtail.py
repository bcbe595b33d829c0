"""Reading an instance's log files: the last lines, then what is appended after them.

Everything here blocks on file I/O and knows nothing of HTTP: callers on the event loop run
:func:`open_log` and :meth:`LogFollower.read_new` in a worker thread (``asyncio.to_thread``).
Only :meth:`LogFollower.close` is safe to call from the loop, since it never waits.

The server's log rotator (``instances.logrotate``) cuts the head off a log that grew too big and
keeps it as ``<log>.1`` (older ones shift to ``.2`` ...), while the writer (QEMU, which holds the
file open for appending) goes on writing. A reader's offset then points at other bytes: the
:class:`RotationLedger` says how much each rotation cut, and readers and the rotator take its
per-file lock, so that a reader sees a rotation whole or not at all and finds its place again.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hypemand.layout import rotated_log

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


def rotated_name(path: Path, number: int) -> Path:
    """``app.log`` -> ``app.log.1``: where the rotator keeps the head it cut, 1 the newest."""
    return rotated_log(path, number)


# ---- rotations ------------------------------------------------------------------------------


@dataclass
class _LogRotations:
    lock: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0  # rotations so far
    cuts: deque[int] = field(default_factory=lambda: deque(maxlen=RotationLedger.REMEMBERED))


class RotationLedger:
    """Per log file: how many bytes each rotation cut from its head, newest last.

    Whoever rotates a file or reads it at an offset takes :meth:`lock` around it; the rotator
    calls :meth:`record` before letting go. One ledger serves the whole server (:data:`ROTATIONS`):
    rotations are done by this process only, to files only it reads."""

    REMEMBERED = 16  # a reader more rotations behind than this lost its place anyway

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._logs: dict[str, _LogRotations] = {}

    def lock(self, path: Path) -> threading.Lock:
        return self._entry(path).lock

    def generation(self, path: Path) -> int:
        return self._entry(path).generation

    def cuts_since(self, path: Path, generation: int) -> list[int] | None:
        """The cuts made after ``generation``, oldest first; None if they are no longer known."""
        entry = self._entry(path)
        behind = entry.generation - generation
        if behind < 0 or behind > len(entry.cuts):
            return None
        return list(entry.cuts)[len(entry.cuts) - behind :]

    def record(self, path: Path, removed: int) -> None:
        """A rotation cut ``removed`` bytes; the caller holds :meth:`lock`."""
        entry = self._entry(path)
        entry.generation += 1
        entry.cuts.append(removed)

    def retain(self, paths: Iterable[Path]) -> None:
        """Forget the files not named (their instances are gone)."""
        keep = {os.path.abspath(path) for path in paths}
        with self._guard:
            for key in [key for key in self._logs if key not in keep]:
                del self._logs[key]

    def _entry(self, path: Path) -> _LogRotations:
        key = os.path.abspath(path)
        with self._guard:
            entry = self._logs.get(key)
            if entry is None:
                entry = self._logs[key] = _LogRotations()
            return entry


ROTATIONS = RotationLedger()


# ---- lines ----------------------------------------------------------------------------------


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


# ---- tail -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogTail:
    lines: list[str]  # the last complete lines, at most the count asked for
    partial: bytes  # an unterminated last line ("" if the file ends with a newline)
    # Where ``partial`` starts in the file: following resumes there. Negative when it began in
    # the rotated file before (``before``): then its first -partial_offset bytes came from there.
    partial_offset: int


def _read_back(
    file: BinaryIO, count: int, block_bytes: int, budget: int, newlines: int
) -> tuple[list[bytes], int, int]:
    """Blocks from the end of ``file`` backwards (last block first) until they hold more than
    ``count`` newlines in all (``newlines`` were found already) or ``budget`` bytes are read.
    Returns the blocks, where the first of them starts, and the newlines counted."""
    size = os.fstat(file.fileno()).st_size
    blocks: list[bytes] = []
    start = size
    while start > 0 and size - start < budget and newlines <= count:
        step = min(block_bytes, start, budget - (size - start))
        start -= step
        file.seek(start)
        block = file.read(step)
        blocks.append(block)
        newlines += block.count(b"\n")
    return blocks, start, newlines


def read_tail(
    file: BinaryIO,
    count: int,
    block_bytes: int = TAIL_BLOCK_BYTES,
    scan_limit: int = TAIL_SCAN_LIMIT_BYTES,
    before: BinaryIO | None = None,
) -> LogTail:
    """The last ``count`` complete lines of a file, read backwards from its end in blocks, so a
    multi-GB log costs only its last few blocks. If the file holds fewer lines and ``before`` is
    given (the rotated file that preceded it), the rest come from the end of that one: the two
    read as one log. Blocking: call it in a worker thread."""
    # count lines need count + 1 newlines: the one before the first line says where it starts.
    blocks, start, newlines = _read_back(file, count, block_bytes, scan_limit, 0)
    current = b"".join(reversed(blocks))
    earlier = b""
    if start == 0 and before is not None and newlines <= count and len(current) < scan_limit:
        older, start, newlines = _read_back(before, count, block_bytes, scan_limit - len(current), newlines)
        earlier = b"".join(reversed(older))
    data = earlier + current
    cut = data.rfind(b"\n") + 1  # just past the last complete line; 0 if there is none
    pieces = data[:cut].split(b"\n")[:-1] if cut else []
    if start > 0 and pieces:
        pieces = pieces[1:]  # the scan began inside a line: its first piece is not a whole line
    lines = [decode_log_line(raw) for raw in pieces[-count:]] if count else []
    return LogTail(lines=lines, partial=data[cut:], partial_offset=cut - len(earlier))


# ---- following ------------------------------------------------------------------------------


@dataclass
class _RotatedRest:
    """The part of a rotated copy a follower had not read when the rotation happened."""

    file: BinaryIO
    offset: int
    end: int


class LogFollower:
    """What is appended to a log file after an offset: across this server's rotations (the
    unread part of a rotated head is read from its copy first, see :class:`RotationLedger`),
    across truncation by others (starts again at 0), and across rotation by renaming (the old
    file is read to its end, then the new one from its start).

    ``read_new`` blocks (file I/O) and runs in a worker thread; ``close`` never blocks, so the
    event loop may call it even while a read is in progress (that read's thread then closes).
    ``pending`` is the start of an unterminated line that came before ``offset``."""

    def __init__(
        self,
        path: Path,
        file: BinaryIO,
        offset: int,
        read_limit: int = FOLLOW_READ_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
        *,
        pending: bytes = b"",
        generation: int | None = None,
        ledger: RotationLedger = ROTATIONS,
    ) -> None:
        self.path = path
        self._file = file
        self._offset = offset
        self._read_limit = read_limit
        self._splitter = LineSplitter(max_line_bytes)
        self._ready = self._splitter.feed(pending)
        self._ledger = ledger
        self._generation = ledger.generation(path) if generation is None else generation
        self._rotated: list[_RotatedRest] = []
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
        # flag after releasing it, so one of the two closes the files.
        self._close_requested = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._closed = True
                    self._file.close()
                    for rest in self._rotated:
                        rest.file.close()
            finally:
                self._lock.release()

    def _read_locked(self) -> list[str]:
        lines, self._ready = self._ready, []
        with self._ledger.lock(self.path):
            self._catch_up_with_rotations()
            current = os.fstat(self._file.fileno())
            if current.st_size < self._offset:
                # Truncated in place by someone else: the writer goes on from the start. A held
                # partial line is kept: the writer's next bytes continue it.
                self._offset = 0
            elif current.st_size == self._offset and self._replaced(current):
                # Rotated by renaming, and the old file is read to its end: go on with the new one.
                try:
                    successor = open(self.path, "rb", buffering=0)  # noqa: SIM115 - owned by self
                except FileNotFoundError:
                    return lines
                self._file.close()
                self._file = successor
                self._offset = 0
            return lines + self._drain()

    def _catch_up_with_rotations(self) -> None:
        generation = self._ledger.generation(self.path)
        if generation == self._generation:
            return
        cuts = self._ledger.cuts_since(self.path, self._generation)
        self._generation = generation
        if cuts is None:
            # Too many rotations behind: what was not read left the copies kept. Go on from the
            # start of what the file holds now.
            self._offset = 0
            return
        for index, removed in enumerate(cuts):
            if self._offset >= removed:
                self._offset -= removed
                continue
            # Part of what this rotation cut was not read yet: it is in that rotation's copy,
            # numbered by how many rotations came after it (if that many copies are kept).
            copy = rotated_name(self.path, len(cuts) - index)
            try:
                rest = open(copy, "rb", buffering=0)  # noqa: SIM115 - owned by self
            except FileNotFoundError:
                pass
            else:
                self._rotated.append(_RotatedRest(rest, self._offset, removed))
            self._offset = 0

    def _replaced(self, current: os.stat_result) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away and no successor yet: the old file may still grow
        return (named.st_ino, named.st_dev) != (current.st_ino, current.st_dev)

    def _drain(self) -> list[str]:
        lines: list[str] = []
        budget = self._read_limit
        while budget > 0 and self._rotated:
            rest = self._rotated[0]
            step = min(budget, _FOLLOW_READ_STEP, rest.end - rest.offset)
            chunk = os.pread(rest.file.fileno(), step, rest.offset) if step > 0 else b""
            if not chunk:
                rest.file.close()
                self._rotated.pop(0)
                continue
            rest.offset += len(chunk)
            budget -= len(chunk)
            lines += self._splitter.feed(chunk)
        while budget > 0:
            chunk = os.pread(self._file.fileno(), min(budget, _FOLLOW_READ_STEP), self._offset)
            if not chunk:
                break
            self._offset += len(chunk)
            budget -= len(chunk)
            lines += self._splitter.feed(chunk)
        return lines


def open_log(
    path: Path, tail: int, follow: bool, ledger: RotationLedger = ROTATIONS
) -> tuple[list[str], LogFollower | None]:
    """The last ``tail`` lines (reaching into the last rotated copy if the log was just
    rotated) and, when following, a follower positioned after them. Blocking.
    Raises FileNotFoundError if the log has not been written yet."""
    with ledger.lock(path):
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - handed to the follower or closed here
        try:
            before = _open_if_present(rotated_name(path, 1))
            try:
                found = read_tail(file, tail, before=before)
            finally:
                if before is not None:
                    before.close()
        except BaseException:
            file.close()
            raise
        generation = ledger.generation(path)
    if follow:
        # The follower starts at the partial last line, which it emits once it is complete; a
        # part of that line that is in the rotated copy is handed over as already read.
        began_before = found.partial[: -found.partial_offset] if found.partial_offset < 0 else b""
        start = max(0, found.partial_offset)
        follower = LogFollower(path, file, start, pending=began_before, generation=generation, ledger=ledger)
        return found.lines, follower
    file.close()
    lines = found.lines
    if found.partial and tail:
        lines = [*lines, decode_log_line(found.partial)][-tail:]
    return lines, None


def _open_if_present(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None
