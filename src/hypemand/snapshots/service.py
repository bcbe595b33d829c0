"""Stored snapshots: immutable copies of an instance's disks (and, for kind Standby, its saved
VM) that outlive their source, can be restored into it, and forked into new instances.

The instance domain does everything that touches an instance (under the instance's lock); this
service owns the snapshot directories, their records, digests and compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hypemand.errors import BadRequest, Conflict, NotFound
from hypemand.fsutil import write_model_atomic
from hypemand.hypervisor.base import Board
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import Instance, InstanceState
from hypemand.instances.saved import SavedVM
from hypemand.layout import DataLayout, SnapshotPaths
from hypemand.savedvm.codec import CompressedMemory
from hypemand.savedvm.digest import file_digest
from hypemand.savedvm.files import SavedVMFiles, VerifiedFiles
from hypemand.savedvm.jobs import CompressionJobs, OnDone, ensure_raw_memory
from hypemand.savedvm.models import SnapshotCompressionConfig
from hypemand.snapshots.models import (
    CreateSnapshotRequest,
    ForkInstanceRequest,
    ForkSnapshotRequest,
    RestoreSnapshotRequest,
    Snapshot,
    SnapshotKind,
    SnapshotRecord,
)

log = logging.getLogger(__name__)

# Target states a restore or fork may ask for, by snapshot kind; the first is the default.
TARGETS: dict[str, tuple[InstanceState, ...]] = {
    "Standby": (InstanceState.RUNNING, InstanceState.STANDBY, InstanceState.STOPPED),
    "Stopped": (InstanceState.STOPPED, InstanceState.RUNNING),
}


def new_snapshot_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(23))


class SnapshotService:
    def __init__(self, layout: DataLayout, instances: InstanceManager, jobs: CompressionJobs) -> None:
        self.layout = layout
        self.root = layout.snapshots
        self.instances = instances
        self.jobs = jobs
        self._records: dict[str, SnapshotRecord] = {}
        self._uses: dict[str, _Use] = {}
        self._creating = asyncio.Lock()  # names are unique per source: decided one create at a time
        self._reserved: set[tuple[str, str]] = set()
        self._verified = VerifiedFiles()

    # ---- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        for directory in await asyncio.to_thread(
            lambda: sorted(p for p in self.root.iterdir() if p.is_dir())
        ):
            try:
                record = await asyncio.to_thread(_load, SnapshotPaths(directory).record)
            except ValueError as exc:
                # Records are written atomically: this is damage from outside. Keep the files.
                log.error("snapshot %s has an unreadable record, leaving it alone: %s", directory.name, exc)
                continue
            if record is None:
                # Never finished (the server died while copying), or a fork's staging copy.
                log.warning("removing unfinished snapshot directory %s", directory.name)
                await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
                continue
            self._records[record.snapshot.id] = record
            if record.snapshot.compression_state == "compressing":
                await self._resume_compression(record)

    async def _resume_compression(self, record: SnapshotRecord) -> None:
        """A compression the last server did not finish: the raw file is still there (it goes only
        after the compressed copy is durable), so start again; partial output is replaced."""
        raw = self._saved(record.snapshot.id).memory
        compression = self.jobs.resolve(record.snapshot.compression, None)
        if compression is not None and raw.exists():
            self.jobs.start_for_snapshot(
                record.snapshot.id, raw, compression, self._on_compressed(record.snapshot.id)
            )
        else:
            await self._set(record.snapshot.id, compression_state="none")

    # ---- reads ------------------------------------------------------------------------------------

    def list(
        self,
        kind: str | None = None,
        name: str | None = None,
        source_instance_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> list[Snapshot]:
        found = []
        for record in self._records.values():
            snapshot = record.snapshot
            if kind is not None and snapshot.kind != kind:
                continue
            if name is not None and snapshot.name != name:
                continue
            if source_instance_id is not None and snapshot.source_instance_id != source_instance_id:
                continue
            if any((snapshot.tags or {}).get(k) != v for k, v in (tags or {}).items()):
                continue
            found.append(snapshot)
        return sorted(found, key=lambda s: (s.created_at, s.id))

    def get(self, snapshot_id: str) -> Snapshot:
        return self._record(snapshot_id).snapshot

    def made_by_schedule(self, instance_id: str) -> tuple[Snapshot, ...]:
        """The snapshots the snapshot schedule of ``instance_id`` made, oldest first (a
        client's own snapshots of the instance are never among them)."""
        made = (r.snapshot for r in self._records.values() if r.scheduled_by == instance_id)
        return tuple(sorted(made, key=lambda s: (s.created_at, s.id)))

    def _record(self, snapshot_id: str) -> SnapshotRecord:
        record = self._records.get(snapshot_id)
        if record is None:
            raise NotFound(f"snapshot {snapshot_id!r} not found")
        return record

    def _saved(self, snapshot_id: str) -> SavedVMFiles:
        return SavedVMFiles(self.layout.snapshot(snapshot_id).payload)

    def _use_of(self, snapshot_id: str) -> _Use:
        return self._uses.setdefault(snapshot_id, _Use())

    @contextlib.asynccontextmanager
    async def _using(self, snapshot_id: str) -> AsyncIterator[SavedVM]:
        """The snapshot's files, ready to start a guest on, for one restore or fork. Any number
        of them run at once; only making the files ready (stopping a compression, expanding,
        the first digest check of each file) is done one at a time, and files still as they
        were when last made ready need no turn at all. A delete waits for them."""
        use = self._use_of(snapshot_id)
        if use.deleting:
            raise NotFound(f"snapshot {snapshot_id!r} is being deleted")
        use.users += 1
        use.idle.clear()
        try:
            saved = await self._still_ready(snapshot_id, use)
            if saved is None:
                async with use.preparing:
                    saved = await self._ready(snapshot_id)
                    digests = self._record(snapshot_id).digests
                    use.ready = await asyncio.to_thread(_ReadyFiles.of, saved, digests)
            yield saved
        finally:
            use.users -= 1
            if use.users == 0:
                use.idle.set()

    # ---- create -----------------------------------------------------------------------------------

    async def create(
        self, ref: str, request: CreateSnapshotRequest, *, scheduled_by: str | None = None
    ) -> Snapshot:
        """``scheduled_by``: the instance whose snapshot schedule takes this one (kept in the
        record, never shown: it is what the schedule's retention goes by)."""
        source = await self.instances.get(ref)
        # Checked again under the instance's lock when the files are captured.
        self.instances.require_readonly_volumes(source.id, "a snapshot")
        wants_compression = request.compression is not None and request.compression.enabled
        if request.kind == "Stopped" and wants_compression:
            raise BadRequest("compression is only supported for Standby snapshots", code="invalid_request")
        record_policy = self.instances.record_of(source.id).snapshot_policy
        compression = None
        if request.kind == "Standby":
            compression = self.jobs.resolve(
                request.compression, record_policy.compression if record_policy else None
            )
        key = (source.id, request.name or "")
        async with self._creating:
            if request.name is not None and (
                key in self._reserved
                or any(
                    s.snapshot.source_instance_id == source.id and s.snapshot.name == request.name
                    for s in self._records.values()
                )
            ):
                raise Conflict(
                    f"instance {source.name} already has a snapshot named {request.name!r}",
                    code="already_exists",
                )
            self._reserved.add(key)
        snapshot_id = new_snapshot_id()
        paths = self.layout.snapshot(snapshot_id)
        saved = SavedVMFiles(paths.payload)
        try:
            instance = await self.instances.capture(source.id, request.kind, saved)
            # Digests and sizes are computed now, after the source runs again: off its pause.
            digests = await asyncio.to_thread(saved.digests)
            size = await asyncio.to_thread(saved.allocated_bytes)
            snapshot = Snapshot(
                id=snapshot_id,
                name=request.name,
                kind=request.kind,
                created_at=datetime.now(UTC),
                size_bytes=size,
                source_instance_id=instance.id,
                source_instance_name=instance.name,
                source_hypervisor=instance.board.value,
                tags=request.tags,
                compression=SnapshotCompressionConfig(
                    enabled=True, algorithm=compression.algorithm, level=compression.level
                )
                if compression
                else None,
                compression_state="compressing" if compression else "none",
            )
            record = SnapshotRecord(
                snapshot=snapshot,
                instance=instance,
                digests=digests,
                qemu_version=await self.instances.hypervisor_version(),
                scheduled_by=scheduled_by,
            )
            await asyncio.to_thread(write_model_atomic, paths.record, record)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, paths.directory, ignore_errors=True)
            raise
        finally:
            self._reserved.discard(key)
        self._records[snapshot_id] = record
        if compression is not None:
            self.jobs.start_for_snapshot(
                snapshot_id, saved.memory, compression, self._on_compressed(snapshot_id)
            )
        return snapshot

    def _on_compressed(self, snapshot_id: str) -> OnDone:
        async def done(result: CompressedMemory | None, error: str | None) -> None:
            if snapshot_id not in self._records:
                return
            if error is not None:
                await self._set(snapshot_id, compression_state="error", compression_error=error)
            elif result is None:
                await self._set(snapshot_id, compression_state="none")
            else:
                size = await asyncio.to_thread(self._saved(snapshot_id).allocated_bytes)
                await self._set(
                    snapshot_id,
                    compression_state="compressed",
                    compression_error=None,
                    compressed_size_bytes=result.compressed_size,
                    uncompressed_size_bytes=result.uncompressed_size,
                    size_bytes=size,
                )

        return done

    async def _set(self, snapshot_id: str, **changes: object) -> None:
        record = self._records[snapshot_id]
        snapshot = record.snapshot.model_copy(update=changes)
        updated = record.model_copy(update={"snapshot": snapshot})
        await asyncio.to_thread(write_model_atomic, self.layout.snapshot(snapshot_id).record, updated)
        self._records[snapshot_id] = updated

    # ---- delete -----------------------------------------------------------------------------------

    async def delete(self, snapshot_id: str) -> None:
        self._record(snapshot_id)
        use = self._use_of(snapshot_id)
        if use.deleting:
            raise NotFound(f"snapshot {snapshot_id!r} not found")
        use.deleting = True  # no new restore or fork; those running finish first
        paths = self.layout.snapshot(snapshot_id)
        try:
            await use.idle.wait()
            async with use.preparing:
                await self.jobs.cancel_for_snapshot(snapshot_id)
                # The record goes first: a crash in the middle leaves an unfinished directory,
                # which the next start removes, never a listed snapshot with half its files.
                await asyncio.to_thread(paths.record.unlink, missing_ok=True)
        except BaseException:
            use.deleting = False  # still listed, still whole: usable again
            raise
        del self._records[snapshot_id]
        self._uses.pop(snapshot_id, None)
        await asyncio.to_thread(shutil.rmtree, paths.directory, ignore_errors=True)

    # ---- restore and fork -------------------------------------------------------------------------

    async def restore(self, ref: str, snapshot_id: str, request: RestoreSnapshotRequest) -> Instance:
        instance = await self.instances.get(ref)
        record = self._record(snapshot_id)
        if record.snapshot.source_instance_id != instance.id:
            raise BadRequest(
                f"snapshot {snapshot_id} belongs to instance "
                f"{record.snapshot.source_instance_id}, not {instance.id}"
            )
        target, board = self._target(record.snapshot.kind, request.target_state, request.target_hypervisor)
        async with self._using(snapshot_id) as saved:
            return await self.instances.restore_snapshot(instance.id, saved, target, board)

    async def fork(self, snapshot_id: str, request: ForkSnapshotRequest) -> Instance:
        record = self._record(snapshot_id)
        target, board = self._target(record.snapshot.kind, request.target_state, request.target_hypervisor)
        async with self._using(snapshot_id) as saved:
            return await self.instances.fork(saved, request.name, target, board)

    async def fork_instance(self, ref: str, request: ForkInstanceRequest) -> Instance:
        source = await self.instances.get(ref)
        self.instances.require_readonly_volumes(source.id, "a fork")
        state = source.state
        if state is InstanceState.RUNNING and not request.from_running:
            raise Conflict(
                f"instance {source.name} is Running: set from_running=true to fork a running instance",
                code="invalid_state",
            )
        if state not in (InstanceState.RUNNING, InstanceState.STANDBY, InstanceState.STOPPED):
            raise Conflict(
                f"cannot fork instance {source.name} from state {state.value}", code="invalid_state"
            )
        target = request.target_state or state
        if target not in (InstanceState.RUNNING, InstanceState.STANDBY, InstanceState.STOPPED):
            raise BadRequest(f"target_state must be Running, Standby or Stopped, not {target.value}")
        kind: SnapshotKind = "Stopped" if state is InstanceState.STOPPED else "Standby"
        if kind == "Stopped" and target is InstanceState.STANDBY:
            raise BadRequest("a Stopped instance forks into Stopped or Running, not Standby")
        staging = self.layout.fork_staging(new_snapshot_id())
        files = SavedVMFiles(staging.payload)
        try:
            instance = await self.instances.capture(source.id, kind, files)
            saved = SavedVM(
                snapshot_id=f"(fork of {source.name})",
                kind=kind,
                files=files,
                record=instance,
                state_digest=(
                    await asyncio.to_thread(file_digest, files.device_state) if kind == "Standby" else None
                ),
                qemu_version=await self.instances.hypervisor_version(),
            )
            return await self.instances.fork(saved, request.name, target, None)
        finally:
            # The fork holds its own copies and a link to the RAM file: the staging copy can go.
            await asyncio.to_thread(shutil.rmtree, staging.directory, ignore_errors=True)

    def _target(
        self, kind: str, requested: InstanceState | None, hypervisor: str | None
    ) -> tuple[InstanceState, Board | None]:
        allowed = TARGETS[kind]
        target = requested or allowed[0]
        if target not in allowed:
            raise BadRequest(
                f"target_state {target.value} is not allowed for a {kind} snapshot; use one of "
                f"{', '.join(t.value for t in allowed)}"
            )
        board = None
        if hypervisor is not None:
            if kind != "Stopped":
                raise BadRequest(
                    "target_hypervisor is only allowed for Stopped snapshots: "
                    "a Standby snapshot resumes on the hypervisor that saved it"
                )
            offered = {b.value: b for b in self.instances.available_boards()}
            if hypervisor not in offered:
                raise BadRequest(
                    f"hypervisor {hypervisor!r} is not available on this host; "
                    f"it offers: {', '.join(offered)}",
                    code="invalid_hypervisor",
                )
            board = offered[hypervisor]
        return target, board

    async def _still_ready(self, snapshot_id: str, use: _Use) -> SavedVM | None:
        """The files as an earlier restore or fork made them ready, if nothing has touched them
        since (same inode, size and mtime each; no compression): many forks at once then need
        no turn at the preparation lock, only a few stats. None: prepare them under the lock."""
        ready = use.ready
        record = self._record(snapshot_id)
        if (
            ready is None
            or use.preparing.locked()
            or record.snapshot.compression_state not in ("none", "error")
            or record.digests != ready.digests
        ):
            return None
        now = await asyncio.to_thread(_identities, ready.saved.files, ready.digests)
        return ready.saved if now == ready.identities else None

    async def _ready(self, snapshot_id: str) -> SavedVM:
        """Stop any compression of the snapshot, make its RAM file raw again, and check every
        file against its digest: a guest never starts on a truncated or altered file."""
        await self.jobs.cancel_for_snapshot(snapshot_id)
        record = self._record(snapshot_id)
        files = self._saved(snapshot_id)
        if record.snapshot.kind == "Standby":
            raw = files.memory
            expanded = not await asyncio.to_thread(raw.exists)
            checked = await asyncio.to_thread(ensure_raw_memory, raw)
            if checked is not None and checked == record.digests.get(raw.name):
                # The expansion already checked the content against this very digest.
                await asyncio.to_thread(self._verified.mark, raw)
            if expanded or record.snapshot.compression_state == "compressing":
                size = await asyncio.to_thread(files.allocated_bytes)
                await self._set(
                    snapshot_id,
                    compression_state="none",
                    compressed_size_bytes=None,
                    uncompressed_size_bytes=None,
                    size_bytes=size,
                )
        await asyncio.to_thread(
            self._verified.verify, files, record.digests, f"snapshot {record.snapshot.id}"
        )
        return SavedVM(
            snapshot_id=snapshot_id,
            kind=record.snapshot.kind,
            files=files,
            record=record.instance,
            state_digest=record.digests.get(files.device_state.name),
            qemu_version=record.qemu_version,
        )


@dataclass(frozen=True)
class _ReadyFiles:
    """A snapshot's files as they were when last made ready and checked against ``digests``."""

    saved: SavedVM
    digests: dict[str, str]
    identities: dict[str, tuple[int, int, int]]

    @classmethod
    def of(cls, saved: SavedVM, digests: dict[str, str]) -> _ReadyFiles:
        """Blocking (stats the files)."""
        return cls(saved, dict(digests), _identities(saved.files, digests))


def _identities(files: SavedVMFiles, digests: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """Blocking. Inode, size and mtime of each file with a digest: any write or replacement
    changes one of them (a fork's hard link to the RAM file changes only the ctime)."""
    found = {}
    for name in digests:
        try:
            info = files.paths.file(name).stat()
        except FileNotFoundError:
            continue
        found[name] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return found


@dataclass
class _Use:
    """Who is using a snapshot's files."""

    users: int = 0
    deleting: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    preparing: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: _ReadyFiles | None = None  # what the last preparation left; see _still_ready

    def __post_init__(self) -> None:
        self.idle.set()


def _load(path: Path) -> SnapshotRecord | None:
    try:
        return SnapshotRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
