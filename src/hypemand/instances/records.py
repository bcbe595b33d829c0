"""An instance's stored truth and its operations log.

``instance.json`` is written atomically (temp, fsync, rename) in a worker thread, one write at a
time per instance, and never after the instance was deleted (that would bring its directory
back). The operations log (``logs?source=hypeman``) is appended to by one writer task, off the
event loop, in the order the lines were written.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypemand.errors import InsufficientStorage
from hypemand.fsutil import write_model_atomic
from hypemand.instances.live import LiveInstance
from hypemand.instances.models import InstanceRecord

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def phase_change(record: InstanceRecord, phase: str, at: datetime) -> dict[str, Any]:
    """The record's changes for entering ``phase`` at ``at``: the time spent in the phase it
    leaves is added to that phase's total."""
    spent = max(0, int((at - record.phase_since).total_seconds() * 1000))
    phase_ms = dict(record.phase_ms)
    phase_ms[record.phase] = phase_ms.get(record.phase, 0) + spent
    return {"phase": phase, "phase_since": at, "phase_ms": phase_ms}


def load_record(path: Path) -> InstanceRecord | None:
    """Blocking. None if there is no record; ValueError if it cannot be read."""
    try:
        return InstanceRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None


async def save(live: LiveInstance) -> None:
    async with live.write_lock:
        await asyncio.to_thread(write_model_atomic, live.paths.record, live.record)


async def update(live: LiveInstance, **changes: Any) -> None:
    async with live.write_lock:
        if live.deleted:
            return  # its directory is gone: writing would bring it back
        record = live.record.model_copy(update=changes)
        await asyncio.to_thread(write_model_atomic, live.paths.record, record)
        live.record = record


async def note(live: LiveInstance, **changes: Any) -> None:
    """``update`` for history the server observes (a program start, an exit): on a full disk it
    is kept in memory (reads show it; the next write that succeeds stores it) instead of failing
    the watcher that noticed it."""
    try:
        await update(live, **changes)
    except InsufficientStorage as exc:
        if not live.deleted:
            live.record = live.record.model_copy(update=changes)
        log.warning("instance %s: %s; kept in memory until there is space", live.id, exc)


class OperationsLog:
    """A line per thing the server did to an instance, appended off the event loop."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Path, str]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    def write(self, live: LiveInstance, message: str) -> None:
        if live.deleted:
            return
        line = f"{utcnow().isoformat(timespec='milliseconds')} {message}\n"
        self._queue.put_nowait((live.paths.operations_log, line))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="operations-log")

    async def flush(self) -> None:
        """Wait until every line written so far is on disk (a reader, or a delete, calls this)."""
        await self._queue.join()

    async def close(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def _drain(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(_append, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()


def _append(batch: list[tuple[Path, str]]) -> None:
    lines: dict[Path, list[str]] = defaultdict(list)
    for path, line in batch:
        lines[path].append(line)
    for path, texts in lines.items():
        try:
            # Only the logs folder is made here, never the instance's directory: a line that
            # arrives after a delete removed it is dropped instead of bringing it back.
            path.parent.mkdir(exist_ok=True)
            with path.open("a") as oplog:
                oplog.write("".join(texts))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot write the operations log %s: %s", path, exc)
