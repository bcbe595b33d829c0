"""Reading a boot's markers from the console log, incrementally.

State derivation asks "has the program started, has the agent answered, did the program exit?"
on every read; the console is append-only within a boot, so each instance keeps one scanner
that reads only what was appended since its last look (in a worker thread: a chatty program
can write megabytes between two reads).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypemand.guest.markers import ConsoleMarkers, parse_markers

READ_CHUNK = 4 << 20


class ConsoleScanner:
    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""
        self.markers = ConsoleMarkers()
        self._lock = asyncio.Lock()

    async def scan(self) -> ConsoleMarkers:
        async with self._lock:
            await asyncio.to_thread(self._scan)
            return self.markers.model_copy()

    def _scan(self) -> None:
        try:
            with self.path.open("rb") as console:
                console.seek(self.offset)
                while chunk := console.read(READ_CHUNK):
                    self.offset += len(chunk)
                    data = self._partial + chunk
                    complete, _, self._partial = data.rpartition(b"\n")
                    if complete:
                        self._merge(parse_markers(complete.decode(errors="replace")))
        except FileNotFoundError:
            return
        if b"HYPEMAN-" in self._partial:
            # The last line may be complete without its newline (the guest powered off).
            self._merge(parse_markers(self._partial.decode(errors="replace")))

    def _merge(self, found: ConsoleMarkers) -> None:
        update = {key: value for key, value in found.model_dump().items() if value is not None}
        if update:
            self.markers = self.markers.model_validate({**self.markers.model_dump(), **update})
