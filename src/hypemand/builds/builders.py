"""Builders: persistent layer caches for builds (``/builders``).

A builder is a record and an ext4 cache disk (sparse, ``disk_size_gb``) that each of its builds
mounts as buildah's layer store, so a second build of the same Dockerfile reuses the layers of
the first. One build runs on a builder at a time; which one, and which wait, is the build
service's knowledge (:class:`BuilderUsage`), never stored with the builder.

Prune makes the disk empty again (a new file system); delete removes the builder. Both are
refused (409 ``in_use``) while a build runs on the builder or waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import UTC, datetime
from typing import Protocol

from hypemand.builds.models import (
    DEFAULT_BUILDER_DISK_GB,
    Builder,
    BuilderRecord,
    BuilderStatus,
    CreateBuilderRequest,
    new_id,
)
from hypemand.errors import Conflict, NotFound
from hypemand.fsutil import load_record_dirs, write_model_atomic
from hypemand.layout import BUILDER_RECORD, BuilderPaths, DataLayout
from hypemand.volumes.disk import make_disk

log = logging.getLogger(__name__)
GIB = 1 << 30


class BuilderUsage(Protocol):
    """What the build service knows of a builder's builds."""

    def active_build(self, builder_id: str) -> str | None: ...

    def queued_builds(self, builder_id: str) -> list[str]: ...

    def builder_changed(self) -> None: ...


class BuilderService:
    def __init__(self, layout: DataLayout) -> None:
        self.layout = layout
        self.usage: BuilderUsage | None = None
        self._records: dict[str, BuilderRecord] = {}
        self._reserved: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        self._records = await asyncio.to_thread(self._load)
        for record in list(self._records.values()):
            if record.status is BuilderStatus.DELETING:  # a delete the last server did not finish
                await self._remove(record.id)
            elif record.status is BuilderStatus.PRUNING:  # a prune it did not finish: do it again
                await self._prune(record)

    def _load(self) -> dict[str, BuilderRecord]:
        records = load_record_dirs(self.layout.builders, BUILDER_RECORD, BuilderRecord)
        return {record.id: record for record in records}

    # ---- reads ------------------------------------------------------------------------------

    def record(self, builder_id: str) -> BuilderRecord:
        found = self._records.get(builder_id)
        if found is None or found.status is BuilderStatus.DELETING:
            raise NotFound(f"builder {builder_id!r} not found")
        return found

    def cache_disk(self, builder_id: str) -> BuilderPaths:
        return self.layout.builder(builder_id)

    def lock(self, builder_id: str) -> asyncio.Lock:
        """Held by a prune and a delete, and by the build service while it starts a build on it."""
        return self._locks.setdefault(builder_id, asyncio.Lock())

    async def list_builders(self, tags: dict[str, str] | None = None) -> list[Builder]:
        wanted = (tags or {}).items()
        found = [r for r in self._records.values()
                 if r.status is not BuilderStatus.DELETING and all(r.tags.get(k) == v for k, v in wanted)]
        return [self._wire(r) for r in sorted(found, key=lambda r: (r.created_at, r.id))]

    async def get(self, builder_id: str) -> Builder:
        return self._wire(self.record(builder_id))

    def _wire(self, record: BuilderRecord) -> Builder:
        active = self.usage.active_build(record.id) if self.usage else None
        queued = self.usage.queued_builds(record.id) if self.usage else []
        return Builder(
            id=record.id, created_at=record.created_at, disk_size_gb=record.disk_size_gb,
            status=record.status, name=record.name, tags=record.tags, last_used_at=record.last_used_at,
            active_build_id=active, queued_builds=queued,
        )

    # ---- changes ----------------------------------------------------------------------------

    async def create(self, request: CreateBuilderRequest) -> Builder:
        builder_id = request.id or new_id()
        if builder_id in self._records or builder_id in self._reserved:
            raise Conflict(f"builder {builder_id!r} already exists", code="already_exists")
        self._reserved.add(builder_id)
        try:
            record = BuilderRecord(
                id=builder_id, name=request.name, tags=request.tags or {}, created_at=datetime.now(UTC),
                disk_size_gb=request.disk_size_gb or DEFAULT_BUILDER_DISK_GB,
            )
            paths = self.layout.builder(builder_id)
            await asyncio.to_thread(_make_cache, paths, record)
            self._records[builder_id] = record
        finally:
            self._reserved.discard(builder_id)
        return self._wire(record)

    async def used(self, builder_id: str) -> None:
        record = self._records.get(builder_id)
        if record is not None:
            await self._write(record.model_copy(update={"last_used_at": datetime.now(UTC)}))

    async def delete(self, builder_id: str) -> None:
        async with self.lock(builder_id):
            record = self.record(builder_id)
            self._refuse_in_use(record, "delete")
            await self._write(record.model_copy(update={"status": BuilderStatus.DELETING}))
            await self._remove(builder_id)

    async def prune(self, builder_id: str) -> Builder:
        async with self.lock(builder_id):
            record = self.record(builder_id)
            self._refuse_in_use(record, "prune")
            record = await self._write(record.model_copy(update={"status": BuilderStatus.PRUNING}))
            pruned = await self._prune(record)
        if self.usage is not None:  # builds that came while it ran may start now, lock released
            self.usage.builder_changed()
        return self._wire(pruned)

    async def _prune(self, record: BuilderRecord) -> BuilderRecord:
        paths = self.layout.builder(record.id)
        try:
            await asyncio.to_thread(_remake_cache, paths, record)
        except Exception as exc:
            log.exception("pruning builder %s failed", record.id)
            failed = {"status": BuilderStatus.ERROR, "error": str(exc)}
            return await self._write(record.model_copy(update=failed))
        return await self._write(record.model_copy(update={"status": BuilderStatus.READY, "error": None}))

    def _refuse_in_use(self, record: BuilderRecord, what: str) -> None:
        active = self.usage.active_build(record.id) if self.usage else None
        queued = self.usage.queued_builds(record.id) if self.usage else []
        if active or queued:
            users = ", ".join([b for b in [active] if b] + queued)
            raise Conflict(f"cannot {what} builder {record.id}: builds use it ({users})", code="in_use")

    async def _write(self, record: BuilderRecord) -> BuilderRecord:
        await asyncio.to_thread(write_model_atomic, self.layout.builder(record.id).record, record)
        self._records[record.id] = record
        if self.usage is not None:
            self.usage.builder_changed()
        return record

    async def _remove(self, builder_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.layout.builder(builder_id).directory, True)
        self._records.pop(builder_id, None)


def _make_cache(paths: BuilderPaths, record: BuilderRecord) -> None:
    """The disk first, the record last: a record always has its disk."""
    paths.directory.mkdir(parents=True, exist_ok=False)
    try:
        make_disk(paths.cache_disk, record.disk_size_gb * GIB)
        write_model_atomic(paths.record, record)
    except BaseException:
        shutil.rmtree(paths.directory, ignore_errors=True)
        raise


def _remake_cache(paths: BuilderPaths, record: BuilderRecord) -> None:
    fresh = paths.new_cache_disk
    fresh.unlink(missing_ok=True)
    make_disk(fresh, record.disk_size_gb * GIB)
    fresh.replace(paths.cache_disk)
