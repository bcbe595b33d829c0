"""Background compression of saved guest memory, and the rule that nothing reads a memory file
while it is being compressed.

One job per key: ``instance:<id>`` compresses an instance's own standby RAM file,
``snapshot:<id>`` a stored snapshot's. Every reader of a memory file (restore, fork, snapshot
of a Standby instance, delete) first cancels the job and waits for it to stop, then calls
:func:`ensure_raw_memory`, which expands a compressed file back into a sparse raw one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypemand.errors import BadRequest
from hypemand.savedvm.codec import (
    COMPRESSED_SUFFIXES,
    CompressedMemory,
    Compression,
    CompressionCancelled,
    compress_memory,
    compressed_files,
    expand_memory,
    normalize,
)
from hypemand.savedvm.models import CompressionPlan, SnapshotCompressionConfig
from hypemand.units import UnitError, parse_duration

log = logging.getLogger(__name__)


@dataclass
class _Job:
    task: asyncio.Task[None]
    cancelled: threading.Event = field(default_factory=threading.Event)


OnDone = Callable[[CompressedMemory | None, str | None], Awaitable[None]]


def ensure_raw_memory(raw: Path) -> str | None:
    """Make ``raw`` the memory file to read: expand a compressed copy if only that exists, and
    drop compressed copies once the raw file is there. Returns the digest an expansion checked
    the new file against (None if the raw file was there). Blocking: call it from a thread."""
    if raw.exists():
        for stale in compressed_files(raw):
            stale.unlink(missing_ok=True)
        return None
    for suffix in COMPRESSED_SUFFIXES:
        compressed = raw.with_name(raw.name + suffix)
        if compressed.exists():
            digest = expand_memory(compressed, raw, threading.Event())
            for stale in compressed_files(raw):
                stale.unlink(missing_ok=True)
            return digest
    raise FileNotFoundError(f"no memory file {raw.name} (raw or compressed) in {raw.parent}")


def _compress_then_drop_raw(
    raw: Path, compression: Compression, cancelled: threading.Event
) -> CompressedMemory:
    """Blocking. Compress, then remove the raw file in the same thread, so that a reader who
    cancels the job and waits for this thread never finds the raw file about to vanish. A job
    cancelled after the compressed copy was made keeps the raw file: the reader drops the copy."""
    result = compress_memory(raw, compression, cancelled)
    if not cancelled.is_set():
        # The compressed copy is complete and durable: the raw file can go.
        raw.unlink(missing_ok=True)
    return result


class CompressionJobs:
    def __init__(self, default: Compression | None = None) -> None:
        self.default = default
        self._jobs: dict[str, _Job] = {}

    def plan(
        self,
        requested: SnapshotCompressionConfig | None,
        requested_delay: str | None,
        policy: SnapshotCompressionConfig | None,
        policy_delay: str | None,
    ) -> CompressionPlan | None:
        """Resolve standby compression: the request, else the instance's snapshot policy, else the
        server default. The first one present wins, even when it says ``enabled: false``."""
        compression = self.resolve(requested, policy)
        delay_text = requested_delay if requested_delay is not None else policy_delay
        delay = 0.0
        if delay_text is not None:
            try:
                delay = parse_duration(delay_text)
            except UnitError as exc:
                raise BadRequest(f"compression_delay: {exc}", code="invalid_request") from None
        if compression is None:
            return None
        return CompressionPlan(compression=compression, delay_seconds=delay)

    def resolve(
        self, requested: SnapshotCompressionConfig | None, policy: SnapshotCompressionConfig | None
    ) -> Compression | None:
        for candidate in (requested, policy):
            if candidate is not None:
                return normalize(candidate)
        return self.default

    # ---- jobs ------------------------------------------------------------------------------------

    def start_for_instance(self, instance_id: str, raw: Path, plan: CompressionPlan) -> None:
        async def done(result: CompressedMemory | None, error: str | None) -> None:
            if error:
                log.warning("instance %s: standby memory compression failed: %s", instance_id, error)

        self._start(f"instance:{instance_id}", raw, plan.compression, plan.delay_seconds, done)

    async def cancel_for_instance(self, instance_id: str) -> None:
        await self._cancel(f"instance:{instance_id}")

    def start_for_snapshot(
        self, snapshot_id: str, raw: Path, compression: Compression, on_done: OnDone
    ) -> None:
        self._start(f"snapshot:{snapshot_id}", raw, compression, 0.0, on_done)

    async def cancel_for_snapshot(self, snapshot_id: str) -> None:
        await self._cancel(f"snapshot:{snapshot_id}")

    def running(self, key: str) -> bool:
        job = self._jobs.get(key)
        return job is not None and not job.task.done()

    async def close(self) -> None:
        for key in list(self._jobs):
            await self._cancel(key)

    def _start(self, key: str, raw: Path, compression: Compression, delay: float, on_done: OnDone) -> None:
        if self.running(key):
            return
        cancelled = threading.Event()

        async def run() -> None:
            try:
                if delay > 0:
                    await asyncio.sleep(delay)
            except asyncio.CancelledError:
                await on_done(None, None)
                raise
            compressing = asyncio.to_thread(_compress_then_drop_raw, raw, compression, cancelled)
            work = asyncio.ensure_future(compressing)
            try:
                result = await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be cancelled: tell it to stop, and wait until it has (it removes
                # its partial output), so that the reader who cancelled never races it.
                cancelled.set()
                with contextlib.suppress(Exception):
                    await work
                await on_done(None, None)
                raise
            except CompressionCancelled:
                await on_done(None, None)
                return
            except Exception as exc:  # the job's failure belongs in its record, not in the server
                await on_done(None, f"{type(exc).__name__}: {exc}")
                return
            await on_done(result, None)

        task = asyncio.get_running_loop().create_task(run(), name=f"compress-{key}")
        job = _Job(task=task, cancelled=cancelled)
        self._jobs[key] = job

        def forget(_: asyncio.Task[None]) -> None:
            if self._jobs.get(key) is job:
                del self._jobs[key]

        task.add_done_callback(forget)

    async def _cancel(self, key: str) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        job.cancelled.set()  # stops the codec thread at its next chunk
        job.task.cancel()
        # The job's own cancellation and failure are its business; the caller's cancellation
        # (gather raises that one) is not swallowed.
        await asyncio.gather(job.task, return_exceptions=True)
