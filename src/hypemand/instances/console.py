"""Reading a boot's markers from the console log, incrementally.

State derivation asks "has the program started, has the agent answered, did the program exit?"
on every read; the console is append-only within a boot, so each instance keeps one scanner
that reads only what was appended since its last look (in a worker thread: a chatty program
can write megabytes between two reads).

Memory stays bounded whatever the program prints: the file is read in chunks, and of a line
still unterminated at the end of a read only its last :data:`MAX_PARTIAL_BYTES` are kept. A
marker is a short line written whole by the guest's init, so it is always within that tail;
the rest of an endless line (a progress bar redrawn with ``\\r``) is program output.

The log rotator (``instances.logrotate``) moves the head of the file away while a VM runs; it
holds the scanner (:meth:`ConsoleScanner.hold`), scans to the end, rotates, then tells the
scanner how many bytes left the file (:meth:`ConsoleScanner.rebase`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from hypemand.guest.markers import ConsoleMarkers, parse_markers

READ_CHUNK = 1 << 20
MAX_PARTIAL_BYTES = 16 << 10
MARKER_PREFIX = b"HYPEMAN-"


class ConsoleScanner:
    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""
        self.markers = ConsoleMarkers()
        self._lock = asyncio.Lock()

    async def scan(self) -> ConsoleMarkers:
        async with self._lock:
            return await self._scan_locked()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[ConsoleMarkers]:
        """Keep other scans out (the rotator's moment); yields the markers scanned to the end."""
        async with self._lock:
            yield await self._scan_locked()

    def rebase(self, removed: int, rotated_copy: Path) -> None:
        """``removed`` bytes were cut from the head of the console; ``rotated_copy`` holds them.
        Bytes this scanner had not read yet (a copy-then-truncate rotation races the writer) are
        scanned from the copy first. Blocking: call it in a worker thread, under :meth:`hold`."""
        if self.offset < removed:
            try:
                with rotated_copy.open("rb") as copy:
                    self._scan_file(copy, self.offset, removed)
            except FileNotFoundError:
                pass
        self.offset = max(0, self.offset - removed)

    async def _scan_locked(self) -> ConsoleMarkers:
        if self._grown():
            await asyncio.to_thread(self._scan)
        # Nothing appended since the last look: no thread hop for a read of a quiet VM.
        return self.markers.model_copy()

    def _grown(self) -> bool:
        try:
            return os.stat(self.path).st_size != self.offset
        except FileNotFoundError:
            return False

    def _scan(self) -> None:
        try:
            with self.path.open("rb") as console:
                self.offset = self._scan_file(console, self.offset, None)
        except FileNotFoundError:
            return
        if MARKER_PREFIX in self._partial:
            # The last line may be complete without its newline (the guest powered off).
            self._merge_from(self._partial)

    def _scan_file(self, console: BinaryIO, start: int, end: int | None) -> int:
        """Scan ``console`` from ``start`` to ``end`` (or its end); returns where it stopped."""
        position = start
        while end is None or position < end:
            want = READ_CHUNK if end is None else min(READ_CHUNK, end - position)
            chunk = os.pread(console.fileno(), want, position)
            if not chunk:
                break
            position += len(chunk)
            data = self._partial + chunk
            cut = data.rfind(b"\n") + 1
            self._merge_from(data, cut)
            self._partial = data[max(cut, len(data) - MAX_PARTIAL_BYTES) :]
        return position

    def _merge_from(self, data: bytes, end: int | None = None) -> None:
        for line in _marker_lines(data, len(data) if end is None else end):
            self._merge(parse_markers(line.decode(errors="replace")))

    def _merge(self, found: ConsoleMarkers) -> None:
        update = {key: value for key, value in found.model_dump().items() if value is not None}
        if update:
            self.markers = self.markers.model_validate({**self.markers.model_dump(), **update})


def _marker_lines(data: bytes, end: int) -> Iterator[bytes]:
    """Each line of ``data[:end]`` that holds a marker, from the marker on (every marker pattern
    starts with the prefix), in order: only those lines are decoded, never the output around."""
    at = data.find(MARKER_PREFIX, 0, end)
    while at >= 0:
        line_end = data.find(b"\n", at, end)
        line_end = end if line_end < 0 else line_end
        yield data[at:line_end]
        at = data.find(MARKER_PREFIX, line_end, end)
