"""The volume domain: create (empty or from an archive), list, get, delete.

State is the records in memory, loaded at start; every change is written before it is
answered. A volume comes into being in its own directory, disk first and record last, so a
server killed half-way leaves a directory without a record, which the next start removes
(with any staging directory). Ids and names of creates in flight are reserved in memory, so
two creates of one name never both build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from hypemand.errors import Conflict, NotFound
from hypemand.fsutil import storage_errors, write_model_atomic
from hypemand.layout import VOLUME_STAGING_PREFIX, DataLayout, VolumePaths
from hypemand.volumes.archive import BodyReader, Unpacked, Unpacker
from hypemand.volumes.disk import make_disk, max_entries
from hypemand.volumes.models import (
    GIB,
    CreateVolumeRequest,
    Volume,
    VolumeAttachment,
    VolumeRecord,
    new_volume_id,
)

log = logging.getLogger(__name__)

# gzip of incompressible content is a little larger than the content; a body over this much more
# than the volume's size cannot hold a tar that fits.
ARCHIVE_SLACK = 1.01
ARCHIVE_SLACK_BYTES = 16 << 20


class AttachmentDirectory(Protocol):
    """What the instance manager tells about attachments (in memory, synchronous)."""

    def attachments_of(self, volume_id: str) -> list[VolumeAttachment]: ...


class VolumeService:
    def __init__(self, layout: DataLayout) -> None:
        self.layout = layout
        self.attachments: AttachmentDirectory | None = None  # set by the runtime
        self._records: dict[str, VolumeRecord] = {}
        self._reserved: dict[str, str] = {}  # id -> name of creates in flight
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        self._records = await asyncio.to_thread(_load_and_clean, self.layout)

    # ---- reads ------------------------------------------------------------------------------------

    def resolve(self, ref: str) -> VolumeRecord:
        """By id, then exact name, then unique id prefix."""
        if found := self._records.get(ref):
            return found
        named = [r for r in self._records.values() if r.name == ref]
        if len(named) == 1:
            return named[0]
        prefixed = [r for r in self._records.values() if ref and r.id.startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise Conflict("multiple resources match, use full ID", code="ambiguous")
        raise NotFound(f"volume {ref!r} not found")

    def disk_path(self, volume_id: str) -> Path:
        return self.layout.volume(volume_id).disk

    def lock(self, volume_id: str) -> asyncio.Lock:
        """Held by an attach while it checks and records, and by delete."""
        return self._locks.setdefault(volume_id, asyncio.Lock())

    async def list(self, tags: dict[str, str] | None = None) -> list[Volume]:
        wanted = (tags or {}).items()
        found = [r for r in self._records.values() if all(r.tags.get(k) == v for k, v in wanted)]
        return [self._wire(r) for r in sorted(found, key=lambda r: (r.created_at, r.id))]

    async def get(self, ref: str) -> Volume:
        return self._wire(self.resolve(ref))

    def _wire(self, record: VolumeRecord) -> Volume:
        attached = self.attachments.attachments_of(record.id) if self.attachments is not None else []
        return record.to_wire(attached)

    # ---- changes ----------------------------------------------------------------------------------

    async def create(self, request: CreateVolumeRequest) -> Volume:
        volume_id = self._reserve(request)
        try:
            return await self._build(volume_id, request, None)
        finally:
            del self._reserved[volume_id]

    async def create_from_archive(self, request: CreateVolumeRequest, body: AsyncIterator[bytes]) -> Volume:
        """Unpack the tar.gz ``body`` as it arrives into a staging directory, then build the
        volume's file system from it. The body is read to its end whatever happens (bounded by
        the size limit), so a refusal reaches a client that is still sending."""
        limit = int(request.size_bytes * ARCHIVE_SLACK) + ARCHIVE_SLACK_BYTES
        reader = BodyReader(_chunks_from_loop(body, asyncio.get_running_loop()), limit)
        try:
            volume_id = self._reserve(request)
        except Conflict:
            await drain(body, limit)
            raise
        staging = self.layout.volume_staging(secrets.token_hex(8))
        try:
            unpacked = await asyncio.to_thread(_unpack, staging, reader, request.size_bytes)
            return await self._build(volume_id, request, (staging, unpacked))
        except Exception:
            await drain(body, limit - reader.received)
            raise
        finally:
            del self._reserved[volume_id]
            await asyncio.to_thread(shutil.rmtree, staging, True)

    def _reserve(self, request: CreateVolumeRequest) -> str:
        volume_id = request.id or new_volume_id()
        if volume_id in self._records or volume_id in self._reserved:
            raise Conflict(f"a volume with id {volume_id!r} already exists", code="already_exists")
        names = {r.name for r in self._records.values()} | set(self._reserved.values())
        if request.name in names:
            raise Conflict(f"a volume named {request.name!r} already exists", code="name_conflict")
        self._reserved[volume_id] = request.name
        return volume_id

    async def _build(self, volume_id: str, request: CreateVolumeRequest,
                     content: tuple[Path, Unpacked] | None) -> Volume:
        paths = self.layout.volume(volume_id)
        record = VolumeRecord(id=volume_id, name=request.name, size_gb=request.size_gb,
                              tags=dict(request.tags or {}), created_at=datetime.now(UTC))
        tree, unpacked = content if content is not None else (None, None)
        await asyncio.to_thread(_make_volume, paths, record, tree, unpacked)
        self._records[volume_id] = record
        log.info("volume %s (%s) created, %d GiB%s", record.name, record.id, record.size_gb,
                 ", from an archive" if content else "")
        return self._wire(record)

    async def delete(self, ref: str) -> None:
        record = self.resolve(ref)
        async with self.lock(record.id):
            if self._records.get(record.id) is not record:
                raise NotFound(f"volume {ref!r} not found")
            attached = self._wire(record).attachments
            if attached:
                holders = ", ".join(sorted({a.instance_id for a in attached}))
                raise Conflict(f"volume {record.name} is attached to instance(s) {holders}; detach it or "
                               "delete the instances first", code="in_use")
            paths = self.layout.volume(record.id)
            await asyncio.to_thread(paths.record.unlink, True)  # first: a crash now leaves no volume
            del self._records[record.id]
            self._locks.pop(record.id, None)
            await asyncio.to_thread(shutil.rmtree, paths.directory, True)
        log.info("volume %s (%s) deleted", record.name, record.id)


def _make_volume(paths: VolumePaths, record: VolumeRecord, tree: Path | None,
                 unpacked: Unpacked | None) -> None:
    """Disk first, record last; on any failure the directory goes again (in this thread, so a
    caller that was cancelled cannot race the cleanup)."""
    try:
        paths.directory.mkdir(parents=True)
    except FileExistsError:  # not a volume in memory: an unreadable record left alone at start
        raise Conflict(f"the id {record.id!r} is taken by a damaged volume directory",
                       code="already_exists") from None
    try:
        with storage_errors(f"volume {record.name}"):
            make_disk(paths.disk, record.size_gb * GIB, tree, unpacked)
            write_model_atomic(paths.record, record, 0o600)  # last: now the volume exists
    except BaseException:
        shutil.rmtree(paths.directory, ignore_errors=True)
        raise


def _unpack(staging: Path, reader: BodyReader, size_bytes: int) -> Unpacked:
    with storage_errors("the archive's content"):
        staging.mkdir(parents=True, mode=0o700)
        return Unpacker(staging, size_bytes, max_entries(size_bytes)).unpack(reader)


def _chunks_from_loop(body: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Callable[[], bytes]:
    """A blocking ``next_chunk()`` for a worker thread: each call takes the body's next chunk on
    the event loop (b"" at the end)."""

    async def next_chunk() -> bytes:
        return await anext(body, b"")

    def blocking() -> bytes:
        return asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()

    return blocking


async def drain(body: AsyncIterator[bytes], budget: int) -> None:
    """Read what is left of a refused body, up to ``budget`` bytes, so the client gets the answer."""
    with contextlib.suppress(Exception):
        async for chunk in body:
            budget -= len(chunk)
            if budget < 0:
                return


def _load_and_clean(layout: DataLayout) -> dict[str, VolumeRecord]:
    """The stored volumes; staging directories and volumes without a record (a server was killed
    while making them) are removed."""
    records: dict[str, VolumeRecord] = {}
    root = layout.volumes
    root.mkdir(parents=True, exist_ok=True)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(VOLUME_STAGING_PREFIX):
            log.info("removing the staging directory %s of an unfinished volume", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
            continue
        paths = layout.volume(entry.name)
        if not paths.record.exists():
            log.info("removing %s: a volume that was never finished (or half deleted)", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
            continue
        for leftover in paths.directory.glob(".*.tmp"):  # an atomic write cut short
            leftover.unlink(missing_ok=True)
        try:
            record = VolumeRecord.model_validate_json(paths.record.read_bytes())
        except ValueError as exc:
            log.warning("volume record %s is unreadable, leaving it alone: %s", entry.name, exc)
            continue
        records[record.id] = record
    return records

