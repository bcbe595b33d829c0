"""The instance manager: the one owner of every instance's directory, record and VM.

Everything that changes an instance goes through here, under that instance's lock; reads never
take it. The API, and later standby, snapshots, fork and the CLI, all drive this class.

State is never stored. Each read derives it from what is real (see :meth:`_state`):
- no live VMM process: ``Stopped``;
- otherwise QEMU's run state (asked over QMP with a short bound, the answer shared by concurrent
  readers for a moment), and for a running guest the boot markers on its console:
  ``Initializing`` until the program started (and its agent answered, unless
  ``skip_guest_agent``), then ``Running``; a QMP that does not answer in time: ``Unknown`` with
  ``state_error``.

The record (``instance.json``) holds what cannot be read from the host: what the instance is
(image digest, shape, overrides, policies) and its history (timestamps, exit, phase times). A
watcher task per running VM keeps that history: it notes when the program started and, when
QEMU ends for whatever reason (program exit, stop, crash, kill from outside), records the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import string
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from hypemand.errors import BadRequest, Conflict, DomainError, InvalidState, NotFound
from hypemand.fsutil import write_model_atomic
from hypemand.guest.client import AgentClient, AgentError
from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import ConsoleMarkers
from hypemand.hypervisor.base import (
    LAUNCH_RECORD,
    MEMORY_FILE,
    Board,
    ForkIdentity,
    Hypervisor,
    VMHandle,
    VMStatus,
)
from hypemand.hypervisor.qemu_cmdline import guest_mac
from hypemand.images.errors import ImageNotFound
from hypemand.images.models import ReadyImage
from hypemand.images.service import ImageService
from hypemand.instances.boot import GuestSpec, launch_guest
from hypemand.instances.console import ConsoleScanner
from hypemand.instances.host import HostCapacity, host_capacity, process_usage
from hypemand.instances.models import (
    UNSUPPORTED_CREATE_FIELDS,
    CreateInstanceRequest,
    GuestExitInfo,
    Instance,
    InstanceNetwork,
    InstanceRecord,
    InstanceState,
    InstanceStats,
    SnapshotCompressionConfig,
    SnapshotPolicy,
    StandbyInstanceRequest,
    StandbyRecord,
    StartInstanceRequest,
    UpdateInstanceRequest,
    WaitForStateResponse,
    validate_name,
)
from hypemand.layout import CONFIG_DISK, OVERLAY_DISK, STANDBY_RECORD, STATE_FILE, DataLayout, InstancePaths
from hypemand.snapshots.codec import normalize
from hypemand.snapshots.digest import file_digest, verify_file
from hypemand.snapshots.errors import SnapshotCorrupt
from hypemand.snapshots.jobs import CompressionJobs, ensure_raw_memory
from hypemand.snapshots.sparse import copy_sparse, link_or_copy, make_durable
from hypemand.system.files import SystemFiles
from hypemand.units import UnitError, format_size, parse_duration, parse_size

log = logging.getLogger(__name__)

SnapshotKind = Literal["Standby", "Stopped"]

DEFAULT_HYPERVISOR = Board.QEMU_MICROVM
MIN_MEMORY = 64 << 20
MIN_OVERLAY = 16 << 20
MAX_OVERLAY = 100 << 30
USER_NETWORK_IP = "10.0.2.15"
STATUS_TIMEOUT = 1.0  # a QMP query-status slower than this makes the state Unknown
STATUS_TTL = 0.5  # readers within this window share one QMP answer
WATCH_INTERVAL = 0.2
# The guest's own grace for the program after the power button (init: SIGTERM, 5 s, SIGKILL);
# the host waits that long plus this before it tells QEMU to quit.
POWEROFF_MARGIN = 2.0
WAIT_POLL = 0.025  # a waiting client learns of Running within this
MAX_WAIT = 300.0
AGENT_CONNECT_TIMEOUT = 10.0
SWEEP_INTERVAL = 1.0
TERMINAL_FOR_WAIT = {InstanceState.STOPPED, InstanceState.STANDBY}

_QEMU_TO_STATE = {
    VMStatus.PAUSED: InstanceState.PAUSED,
    VMStatus.INMIGRATE: InstanceState.PAUSED,
    VMStatus.POSTMIGRATE: InstanceState.PAUSED,
    VMStatus.FINISH_MIGRATE: InstanceState.PAUSED,
    VMStatus.SAVE_VM: InstanceState.PAUSED,
    VMStatus.RESTORE_VM: InstanceState.PAUSED,
    VMStatus.SUSPENDED: InstanceState.PAUSED,
    VMStatus.SHUTDOWN: InstanceState.SHUTDOWN,
    VMStatus.PRELAUNCH: InstanceState.CREATED,
    VMStatus.EXITED: InstanceState.STOPPED,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_instance_id() -> str:
    """24 lowercase alphanumerics starting with a letter, like the reference's CUID2 ids."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(23))


@dataclass
class _Live:
    """The server's in-memory side of one instance."""

    record: InstanceRecord
    paths: InstancePaths
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    handle: VMHandle | None = None
    scanner: ConsoleScanner | None = None
    agent: AgentClient | None = None
    watcher: asyncio.Task[None] | None = None
    status_probe: asyncio.Task[VMStatus] | None = None
    status_value: VMStatus | None = None
    status_at: float = 0.0
    deleted: bool = False
    clock_stale: bool = False  # restored: set the guest's clock before the agent is handed out
    reconnect: asyncio.Task[None] | None = None  # the agent reconnect a restore started
    exit_seen_at: datetime | None = None  # when a read first found the VMM gone, before the watcher

    def vmm_alive(self) -> bool:
        return self.handle is not None and self.handle.is_alive()


class InstanceManager:
    def __init__(
        self,
        layout: DataLayout,
        hypervisor: Hypervisor,
        images: ImageService,
        system: Callable[[], SystemFiles],
        compression: CompressionJobs,
        platform: str = "linux/amd64",
    ) -> None:
        self.compression = compression
        self.layout = layout
        self.hypervisor = hypervisor
        self.images = images
        self._system = system
        self.platform = platform
        self._live: dict[str, _Live] = {}
        self._admission = asyncio.Lock()  # names and capacity are decided one create at a time
        self._reserved_names: set[str] = set()
        self._pending: dict[str, tuple[int, int, str]] = {}  # create in flight: (vcpus, memory, digest)
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle of the manager ------------------------------------------------------------

    async def take_charge(self) -> None:
        """Take charge of every instance in the data directory: adopt VMs that outlived the last
        server, finish the bookkeeping of those that ended meanwhile, and remove what a create
        that died half-way left behind."""
        self.images.content_in_use = self.image_in_use
        guests = self.layout.guests
        await asyncio.to_thread(guests.mkdir, parents=True, exist_ok=True)
        # First, QEMUs that a server which died before recording them left running.
        for orphan in await self.hypervisor.reap_orphans(guests):
            log.warning("ended an orphaned VMM: %s", orphan)
        for directory in sorted(await asyncio.to_thread(lambda: [p for p in guests.iterdir() if p.is_dir()])):
            await self._take_charge(directory)
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="instance-expiry")

    async def release_all(self) -> None:
        """Drop the server's connections. VMs keep running: they outlive the server."""
        tasks = [t for t in (self._sweeper, *self._tasks) if t is not None]
        for live in self._live.values():
            if live.watcher is not None:
                tasks.append(live.watcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for live in self._live.values():
            await self._close_agent(live)
            if live.handle is not None:
                await live.handle.close()

    async def _take_charge(self, directory: Path) -> None:
        paths = InstancePaths(directory)
        try:
            record = await asyncio.to_thread(_load_record, paths.record)
        except ValueError as exc:
            # Records are written atomically, so this is damage from outside: keep the files.
            log.error("instance directory %s has an unreadable record, leaving it alone: %s", directory, exc)
            return
        if record is None or not record.provisioned:
            # A create that died before its first boot launched: nothing of it was promised.
            handle = await self.hypervisor.adopt(directory)
            if handle is not None:
                log.warning(
                    "removing half-created instance %s: ending its VMM (pid %d)", directory.name, handle.pid
                )
                await handle.kill()
                await handle.close()
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
            return
        live = _Live(record=record, paths=paths)
        self._live[record.id] = live
        handle = await self.hypervisor.adopt(directory)
        live.scanner = ConsoleScanner(paths.console_log, record.console_offset)
        if handle is not None:
            log.info("instance %s (%s): adopted VMM pid %d", record.name, record.id, handle.pid)
            live.handle = handle
            self._oplog(live, f"server restarted: adopted running VMM pid {handle.pid}")
            live.watcher = asyncio.create_task(self._watch(live, handle), name=f"watch-{record.id}")
        elif record.phase not in ("stopped", "standby"):
            # It ended while no server watched: record what its console says.
            await self._record_exit(live, at=_mtime(paths.console_log))
        if live.handle is not None:
            await self._finish_interrupted(live)
        await self._resume_standby_compression(live)

    # ---- reads ---------------------------------------------------------------------------------

    def image_in_use(self, digest: str) -> bool:
        return any(live.record.image_digest == digest for live in self._live.values()) or any(
            pending[2] == digest for pending in self._pending.values()
        )

    def _resolve(self, ref: str) -> _Live:
        if live := self._live.get(ref):
            return live
        named = [live for live in self._live.values() if live.record.name == ref]
        if len(named) == 1:
            return named[0]
        prefixed = [live for id_, live in self._live.items() if ref and id_.startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise Conflict("multiple resources match, use full ID", code="ambiguous")
        raise NotFound(f"instance {ref!r} not found")

    @contextlib.asynccontextmanager
    async def _mutating(self, live: _Live) -> AsyncIterator[None]:
        """Hold the instance's lock for a change. An operation that waited for the lock behind a
        delete finds the instance gone: 404, and nothing written or started."""
        async with live.lock:
            if live.deleted:
                raise NotFound(f"instance {live.record.name!r} was deleted")
            yield

    def record_of(self, ref: str) -> InstanceRecord:
        return self._resolve(ref).record

    async def get(self, ref: str) -> Instance:
        return await self._view(self._resolve(ref))

    async def list_instances(
        self, state: InstanceState | None = None, tags: dict[str, str] | None = None
    ) -> list[Instance]:
        lives = [
            live
            for live in sorted(self._live.values(), key=lambda item: (item.record.created_at, item.record.id))
            if all(live.record.tags.get(k) == v for k, v in (tags or {}).items())
        ]
        views = await asyncio.gather(*(self._view(live) for live in lives))
        return [view for view in views if state is None or view.state == state]

    async def _state(self, live: _Live) -> tuple[InstanceState, str | None]:
        if not live.vmm_alive():
            if live.handle is not None and live.exit_seen_at is None:
                # Ended, and the watcher has not recorded it yet: remember when it was first seen,
                # so this answer already has a stopped_at (and the record gets the same one).
                live.exit_seen_at = utcnow()
            if live.paths.standby_record.exists():
                return InstanceState.STANDBY, None
            return InstanceState.STOPPED, None
        status = await self._vm_status(live)
        if status is VMStatus.UNKNOWN:
            if not live.vmm_alive():
                return InstanceState.STOPPED, None
            return InstanceState.UNKNOWN, f"failed to query hypervisor: no answer within {STATUS_TIMEOUT:g} s"
        if status in _QEMU_TO_STATE:
            return _QEMU_TO_STATE[status], None
        # running, or an error state QEMU still runs in: the boot markers decide.
        markers = await self._markers(live)
        if _booted(markers, live.record):
            return InstanceState.RUNNING, None
        return InstanceState.INITIALIZING, None

    async def _vm_status(self, live: _Live) -> VMStatus:
        handle = live.handle
        assert handle is not None
        now = time.monotonic()
        if live.status_value is not None and now - live.status_at < STATUS_TTL:
            return live.status_value
        if live.status_probe is None or live.status_probe.done():
            live.status_probe = asyncio.ensure_future(handle.status(timeout=STATUS_TIMEOUT))
        try:
            async with asyncio.timeout(STATUS_TIMEOUT + 0.25):
                status = await asyncio.shield(live.status_probe)
        except TimeoutError:
            return VMStatus.UNKNOWN
        live.status_value, live.status_at = status, time.monotonic()
        return status

    def _forget_status(self, live: _Live) -> None:
        live.status_value = None
        live.status_probe = None

    async def _markers(self, live: _Live) -> ConsoleMarkers:
        if live.scanner is None:
            return ConsoleMarkers()
        return await live.scanner.scan()

    async def _view(self, live: _Live) -> Instance:
        state, error = await self._state(live)
        record = live.record
        exit_info = record.exit
        if exit_info is None and state is InstanceState.STOPPED and live.scanner is not None:
            found = (await live.scanner.scan()).exit
            if found is not None:
                exit_info = GuestExitInfo(code=found.code, message=found.message)
        now = utcnow()
        # The watcher records a phase change within moments; until it has, show the state just
        # read, so that the phase and the state never disagree in one answer.
        phase = record
        if state.value.lower() != record.phase and state is not InstanceState.UNKNOWN:
            phase = record.model_copy(update=_phase_change(record, state.value.lower(), now))
        phases = _phase_change(phase, phase.phase, now)["phase_ms"]
        return Instance(
            id=record.id,
            name=record.name,
            image=record.image,
            state=state,
            state_error=error,
            created_at=record.created_at,
            expires_at=record.expires_at,
            platform=record.platform,
            size=format_size(record.memory_bytes),
            hotplug_size=format_size(record.hotplug_bytes) if record.hotplug_bytes else None,
            overlay_size=format_size(record.overlay_bytes),
            vcpus=record.vcpus,
            env=record.env,
            tags=record.tags,
            network=InstanceNetwork(
                enabled=record.network_enabled,
                ip=USER_NETWORK_IP if record.network_enabled else None,
                mac=record.mac if record.network_enabled else None,
            ),
            hypervisor=record.board.value,
            started_at=record.started_at,
            stopped_at=record.stopped_at or live.exit_seen_at if state is InstanceState.STOPPED else None,
            exit_code=exit_info.code if exit_info and state is InstanceState.STOPPED else None,
            exit_message=exit_info.message if exit_info and state is InstanceState.STOPPED else None,
            has_snapshot=state is InstanceState.STANDBY,
            snapshot_policy=record.snapshot_policy,
            current_phase=phase.phase,
            current_phase_since=phase.phase_since,
            phase_durations_ms=phases,
        )

    def capacity(self) -> HostCapacity:
        return host_capacity(self.layout.root)

    def allocations(self) -> list[tuple[InstanceRecord, bool]]:
        """Every instance with whether it holds host resources now (a VMM runs)."""
        return [(live.record, live.vmm_alive()) for live in self._live.values()]

    # ---- create ----------------------------------------------------------------------------------

    async def create(self, request: CreateInstanceRequest) -> Instance:
        shape = self._validate_create(request)
        ready = await self._ready_image(request.image)
        instance_id = new_instance_id()
        async with self._admission:
            if request.name in self._reserved_names or any(
                live.record.name == request.name for live in self._live.values()
            ):
                raise Conflict(f"an instance named {request.name!r} already exists", code="name_conflict")
            self._admit(shape.vcpus, shape.memory_bytes + shape.hotplug_bytes)
            self._reserved_names.add(request.name)
            self._pending[instance_id] = (shape.vcpus, shape.memory_bytes + shape.hotplug_bytes, ready.digest)
        paths = self.layout.instance(instance_id)
        try:
            now = utcnow()
            record = InstanceRecord(
                id=instance_id,
                name=request.name,
                image=request.image,
                image_digest=ready.digest,
                platform=ready.platform or self.platform,
                board=shape.board,
                vcpus=shape.vcpus,
                memory_bytes=shape.memory_bytes,
                hotplug_bytes=shape.hotplug_bytes,
                overlay_bytes=shape.overlay_bytes,
                env=request.env or {},
                tags=request.tags or {},
                entrypoint=request.entrypoint,
                cmd=request.cmd,
                network_enabled=request.network.enabled if request.network else True,
                mac=guest_mac(instance_id),
                skip_guest_agent=request.skip_guest_agent,
                snapshot_policy=_normalized_policy(request.snapshot_policy),
                expires_at=shape.expires_at,
                created_at=now,
                phase_since=now,
            )
            live = _Live(record=record, paths=paths)
            await self._save(live)
            self._oplog(
                live,
                f"create: image {request.image} ({ready.digest}), {shape.vcpus} vCPUs, "
                f"{format_size(shape.memory_bytes)} memory, hypervisor {shape.board.value}",
            )
            await self._boot(live, ready)
        except BaseException:
            await self._discard(instance_id, paths)
            raise
        finally:
            self._reserved_names.discard(request.name)
            self._pending.pop(instance_id, None)
        return await self._view(live)

    async def _discard(self, instance_id: str, paths: InstancePaths) -> None:
        """Remove everything a failed create made (its VMM included, if one was launched)."""
        live = self._live.pop(instance_id, None)
        if live is not None:
            if live.watcher is not None:
                live.watcher.cancel()
            await self._close_agent(live)
            if live.handle is not None:
                with contextlib.suppress(Exception):
                    await live.handle.kill()
                await live.handle.close()
        await asyncio.to_thread(shutil.rmtree, paths.directory, ignore_errors=True)

    @dataclass
    class _Shape:
        board: Board
        vcpus: int
        memory_bytes: int
        hotplug_bytes: int
        overlay_bytes: int
        expires_at: datetime | None

    def _validate_create(self, request: CreateInstanceRequest) -> InstanceManager._Shape:
        for name in UNSUPPORTED_CREATE_FIELDS:
            if getattr(request, name) not in (None, [], {}):
                raise BadRequest(f"{name} is not supported yet by this server", code="not_supported")
        if request.network is not None and (
            request.network.bandwidth_download or request.network.bandwidth_upload or request.network.egress
        ):
            raise BadRequest(
                "network bandwidth limits and egress control are not supported yet", code="not_supported"
            )
        board = self._board(request.hypervisor)
        if request.platform is not None and request.platform != self.platform:
            raise BadRequest(
                f"platform {request.platform!r} is not available on this host (it runs {self.platform})",
                code="invalid_platform",
            )
        memory = _size(request.size, "size", "invalid_size")
        if memory < MIN_MEMORY:
            raise BadRequest(f"size must be at least {format_size(MIN_MEMORY)}", code="invalid_size")
        overlay = _size(request.overlay_size, "overlay_size", "invalid_overlay_size")
        if not MIN_OVERLAY <= overlay <= MAX_OVERLAY:
            raise BadRequest(
                f"overlay_size must be between {format_size(MIN_OVERLAY)} and {format_size(MAX_OVERLAY)}",
                code="invalid_overlay_size",
            )
        hotplug = (
            _size(request.hotplug_size, "hotplug_size", "invalid_hotplug_size") if request.hotplug_size else 0
        )
        if hotplug and not self.hypervisor.capabilities().hotplug_memory:
            raise BadRequest(
                f"hotplug_size: memory hotplug is not supported by {board.value} on this server",
                code="invalid_hotplug_size",
            )
        return InstanceManager._Shape(
            board=board,
            vcpus=request.vcpus,
            memory_bytes=memory,
            hotplug_bytes=hotplug,
            overlay_bytes=overlay,
            expires_at=_expiry(request.ttl, request.expires_at),
        )

    def available_boards(self) -> list[Board]:
        return [Board.QEMU_MICROVM, Board.QEMU]

    def _board(self, name: str | None) -> Board:
        if name is None:
            return DEFAULT_HYPERVISOR
        offered = {board.value: board for board in self.available_boards()}
        if name not in offered:
            raise BadRequest(
                f"hypervisor {name!r} is not available on this host; it offers: {', '.join(offered)}",
                code="invalid_hypervisor",
            )
        return offered[name]

    async def _ready_image(self, name: str) -> ReadyImage:
        try:
            return await self.images.get_ready(name)
        except ImageNotFound as exc:
            raise NotFound(f"image {name!r} not found: {exc}") from exc
        except DomainError as exc:
            if exc.code == "image_not_ready":
                raise NotFound(f"image {name!r} is not ready: {exc}", code="image_not_ready") from exc
            raise

    async def _image_of(self, live: _Live) -> ReadyImage:
        """The content the instance was created from (pinned by digest), for a boot or restore."""
        try:
            return await self.images.get_ready_by_digest(live.record.image_digest)
        except ImageNotFound as exc:
            raise NotFound(f"the image of instance {live.record.name} is gone: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _admitted(self, live: _Live) -> AsyncIterator[None]:
        """An existing instance about to hold host resources again (start, restore): admitted,
        and counted as pending until its VMM runs, so concurrent boots cannot overcommit."""
        record = live.record
        memory = record.memory_bytes + record.hotplug_bytes
        async with self._admission:
            self._admit(record.vcpus, memory, excluding=record.id)
            self._pending[record.id] = (record.vcpus, memory, record.image_digest)
        try:
            yield
        finally:
            self._pending.pop(record.id, None)

    def _admit(self, vcpus: int, memory: int, *, excluding: str | None = None) -> None:
        """Refuse work the host cannot give (vCPUs oversubscribed 4x, memory not at all)."""
        capacity = self.capacity()
        pending = [usage for key, usage in self._pending.items() if key != excluding]
        used_cpu = sum(c for c, _, _ in pending)
        used_mem = sum(m for _, m, _ in pending)
        for live in self._live.values():
            if live.record.id != excluding and live.vmm_alive():
                used_cpu += live.record.vcpus
                used_mem += live.record.memory_bytes + live.record.hotplug_bytes
        if used_cpu + vcpus > capacity.cpu_limit:
            raise Conflict(
                f"insufficient resources: {vcpus} vCPUs requested, "
                f"{max(0, capacity.cpu_limit - used_cpu)} of {capacity.cpu_limit} available",
                code="insufficient_resources",
            )
        if used_mem + memory > capacity.memory_limit:
            raise Conflict(
                f"insufficient resources: {format_size(memory)} memory requested, "
                f"{format_size(max(0, capacity.memory_limit - used_mem))} available",
                code="insufficient_resources",
            )

    # ---- boot and watch ----------------------------------------------------------------------------

    def _spec(self, record: InstanceRecord, image: ReadyImage, paths: InstancePaths) -> GuestSpec:
        entrypoint = record.entrypoint if record.entrypoint is not None else (image.entrypoint or [])
        # As in docker run: a new entrypoint drops the image's cmd unless a cmd is given too.
        if record.cmd is not None:
            cmd = record.cmd
        elif record.entrypoint is not None:
            cmd = []
        else:
            cmd = image.cmd or []
        guest = GuestConfig(
            entrypoint=entrypoint,
            cmd=cmd,
            env={**image.env, **record.env},
            working_dir=image.working_dir or "/",
            hostname=record.name,
        )
        return GuestSpec(
            vm_id=record.id,
            directory=paths.directory,
            root_disk=image.disk_path,
            guest=guest,
            board=record.board,
            vcpus=record.vcpus,
            memory_mib=record.memory_bytes >> 20,
            overlay_size_bytes=record.overlay_bytes,
            network=record.network_enabled,
        )

    async def _boot(self, live: _Live, image: ReadyImage) -> None:
        """Launch the VMM (the caller holds the instance's lock or owns it exclusively)."""
        launched = await launch_guest(
            self.hypervisor, self._system(), self._spec(live.record, image, live.paths)
        )
        live.handle = launched.handle
        live.exit_seen_at = None
        live.scanner = ConsoleScanner(live.paths.console_log, launched.console_offset)
        self._forget_status(live)
        now = utcnow()
        await self._update(
            live,
            provisioned=True,
            started_at=now,
            stopped_at=None,
            console_offset=launched.console_offset,
            program_started_at=None,
            agent_ready_at=None,
            identity_pending=False,  # a fresh boot has its own kernel and randomness
            exit=None,
            **_phase_change(live.record, "initializing", now),
        )
        self._live[live.record.id] = live
        self._oplog(live, f"boot: VMM pid {launched.handle.pid} started")
        live.watcher = asyncio.create_task(self._watch(live, launched.handle), name=f"watch-{live.record.id}")

    async def _watch(self, live: _Live, handle: VMHandle) -> None:
        """Keep the record's history while this VMM lives; record its end."""
        try:
            while handle.is_alive():
                markers = await self._markers(live)
                if live.record.program_started_at is None and markers.program_start_ts is not None:
                    await self._update(live, program_started_at=utcnow())
                    self._oplog(live, "program started")
                if live.record.agent_ready_at is None and markers.agent_ready_ts is not None:
                    await self._update(live, agent_ready_at=utcnow())
                if live.record.phase == "initializing" and _booted(markers, live.record):
                    await self._update(live, **_phase_change(live.record, "running", utcnow()))
                if markers.exit is not None:
                    break
                await handle.wait_exit(WATCH_INTERVAL)
            await handle.wait_exit()
            async with live.lock:
                if live.handle is handle and not live.deleted:
                    await self._record_exit(live, at=utcnow())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("instance %s: watcher failed", live.record.id)

    async def _record_exit(self, live: _Live, at: datetime) -> None:
        """The VMM is gone: close what pointed at it and note how the program ended."""
        # Readers see this moment as stopped_at from now on, until the record holds it.
        at = live.exit_seen_at = live.exit_seen_at or at
        await self._close_agent(live)
        if live.handle is not None:
            await live.handle.close()
            live.handle = None
        self._forget_status(live)
        markers = await self._markers(live)
        exit_info = (
            GuestExitInfo(code=markers.exit.code, message=markers.exit.message) if markers.exit else None
        )
        await self._update(live, stopped_at=at, exit=exit_info, **_phase_change(live.record, "stopped", at))
        live.exit_seen_at = None
        detail = f"exit code {exit_info.code} ({exit_info.message})" if exit_info else "no exit recorded"
        self._oplog(live, f"stopped: {detail}")

    # ---- lifecycle operations ------------------------------------------------------------------

    async def stop(self, ref: str) -> Instance:
        live = self._resolve(ref)
        async with self._mutating(live):
            state, _ = await self._state(live)
            if state not in (InstanceState.RUNNING, InstanceState.INITIALIZING):
                raise InvalidState(
                    f"instance {live.record.name} is {state.value}; stop needs Running or Initializing"
                )
            handle = live.handle
            assert handle is not None
            self._oplog(live, "stop requested")
            await self._close_agent(live)
            outcome = await handle.shutdown(timeout=live.record.stop_timeout + POWEROFF_MARGIN)
            self._oplog(live, f"stop: {outcome.value}")
            await self._record_exit(live, at=utcnow())
        return await self._view(live)

    async def start(self, ref: str, request: StartInstanceRequest) -> Instance:
        live = self._resolve(ref)
        async with self._mutating(live):
            state, _ = await self._state(live)
            if state is not InstanceState.STOPPED:
                raise InvalidState(f"instance {live.record.name} is {state.value}; start needs Stopped")
            image = await self._image_of(live)
            async with self._admitted(live):
                changes: dict[str, Any] = {}
                if request.entrypoint is not None:
                    changes["entrypoint"] = request.entrypoint
                if request.cmd is not None:
                    changes["cmd"] = request.cmd
                if changes:
                    await self._update(live, **changes)
                self._oplog(live, "start requested")
                await self._boot(live, image)
        return await self._view(live)

    async def delete(self, ref: str, graceful: bool = False) -> None:
        live = self._resolve(ref)
        async with self._mutating(live):
            if live.deleted:
                raise NotFound(f"instance {ref!r} not found")
            live.deleted = True
            handle = live.handle
            await self.compression.cancel_for_instance(live.record.id)
            await self._close_agent(live)
            if handle is not None and handle.is_alive():
                if graceful:
                    await handle.shutdown(timeout=live.record.stop_timeout + POWEROFF_MARGIN)
                else:
                    await handle.kill()
            if handle is not None:
                await handle.close()
            live.handle = None
            if live.watcher is not None and live.watcher is not asyncio.current_task():
                live.watcher.cancel()
            # Files first: an instance leaves the list only once nothing of it is left on disk.
            await asyncio.to_thread(shutil.rmtree, live.paths.directory, ignore_errors=True)
            self._live.pop(live.record.id, None)
        log.info("instance %s (%s) deleted", live.record.name, live.record.id)
        await self.images.release(live.record.image_digest)

    async def update(self, ref: str, request: UpdateInstanceRequest) -> Instance:
        live = self._resolve(ref)
        for name in ("auto_standby", "health_check", "restart_policy"):
            if getattr(request, name) is not None:
                raise BadRequest(f"{name} is not supported yet by this server", code="not_supported")
        async with self._mutating(live):
            changes: dict[str, Any] = {}
            if request.env is not None:
                changes["env"] = {**live.record.env, **request.env}
            if request.ttl is not None or request.expires_at is not None:
                current = live.record.expires_at
                if current is not None and current <= utcnow():
                    raise Conflict(f"instance {live.record.name} has already expired", code="expired")
                changes["expires_at"] = _expiry(request.ttl, request.expires_at)
            if changes:
                await self._update(live, **changes)
                self._oplog(live, f"update: {', '.join(sorted(changes))}")
        return await self._view(live)

    async def wait(self, ref: str, target: InstanceState, timeout: float) -> WaitForStateResponse:  # noqa: ASYNC109
        live = self._resolve(ref)
        deadline = time.monotonic() + min(max(timeout, 0.0), MAX_WAIT)
        while True:
            if live.deleted:
                raise NotFound(f"instance {ref!r} was deleted")
            state, error = await self._state(live)
            if state is target:
                return WaitForStateResponse(state=state, timed_out=False, state_error=error)
            if state in TERMINAL_FOR_WAIT and target not in TERMINAL_FOR_WAIT:
                return WaitForStateResponse(state=state, timed_out=False, state_error=error)
            if time.monotonic() >= deadline:
                return WaitForStateResponse(state=state, timed_out=True, state_error=error)
            await asyncio.sleep(WAIT_POLL)

    async def stats(self, ref: str) -> InstanceStats:
        live = self._resolve(ref)
        handle = live.handle
        usage = await asyncio.to_thread(process_usage, handle.pid) if handle is not None else None
        if usage is None:
            state, _ = await self._state(live)
            raise InvalidState(f"instance {live.record.name} is {state.value}; stats need a running VM")
        rx, tx = await self._guest_network_counters(live)
        allocated = live.record.memory_bytes + live.record.hotplug_bytes
        return InstanceStats(
            instance_id=live.record.id,
            instance_name=live.record.name,
            cpu_seconds=usage.cpu_seconds,
            memory_rss_bytes=usage.rss_bytes,
            memory_vms_bytes=usage.vms_bytes,
            network_rx_bytes=rx,
            network_tx_bytes=tx,
            allocated_vcpus=live.record.vcpus,
            allocated_memory_bytes=allocated,
            memory_utilization_ratio=min(1.0, usage.rss_bytes / allocated) if allocated else None,
        )

    async def _guest_network_counters(self, live: _Live) -> tuple[int, int]:
        """Bytes the guest's NIC received and sent (user-mode networking has no host TAP to read)."""
        if not live.record.network_enabled:
            return 0, 0
        try:
            state, _ = await self._state(live)
            if state is not InstanceState.RUNNING:
                return 0, 0
            agent = await self._agent(live)
            async with asyncio.timeout(2.0):
                rx = await agent.read_file("/sys/class/net/eth0/statistics/rx_bytes")
                tx = await agent.read_file("/sys/class/net/eth0/statistics/tx_bytes")
            return int(rx.strip() or 0), int(tx.strip() or 0)
        except (DomainError, TimeoutError, ValueError) as exc:
            log.debug("instance %s: no network counters: %s", live.record.id, exc)
            return 0, 0

    # ---- standby and restore ---------------------------------------------------------------------

    async def standby(self, ref: str, request: StandbyInstanceRequest) -> Instance:
        """Pause the VM, save its device state, end QEMU; the RAM file stays where it is."""
        live = self._resolve(ref)
        plan = self.compression.plan(request.compression, request.compression_delay, live.record)
        async with self._mutating(live):
            state, _ = await self._state(live)
            if state is not InstanceState.RUNNING:
                raise InvalidState(f"cannot standby instance {live.record.name} from state {state.value}")
            handle = live.handle
            assert handle is not None
            paths = live.paths
            self._oplog(live, "standby requested")
            await self._close_agent(live)
            await self.hypervisor.save_state(handle, paths.state_file)
            try:
                standby = StandbyRecord(
                    created_at=utcnow(),
                    state_digest=await asyncio.to_thread(file_digest, paths.state_file),
                    memory_size=(await asyncio.to_thread(paths.memory_file.stat)).st_size,
                    qemu_version=await asyncio.to_thread(self.hypervisor.version),
                    # Kept with the saved VM, so a server restart resumes an unfinished job.
                    compression=plan,
                )
                await asyncio.to_thread(write_model_atomic, paths.standby_record, standby)
            except BaseException:
                # Nothing is lost yet: QEMU still holds the VM. Let it run on.
                await asyncio.to_thread(_remove_standby_files, paths)
                with contextlib.suppress(DomainError):
                    await handle.resume()
                raise
            # From here the saved VM is complete on disk; ending QEMU cannot lose it.
            live.handle = None
            self._forget_status(live)
            await self.hypervisor.end_saved(handle)
            now = utcnow()
            await self._update(live, stopped_at=now, **_phase_change(live.record, "standby", now))
            self._oplog(live, "standby: device state saved, VMM ended")
            if plan is not None:
                self.compression.start_for_instance(live.record.id, paths.memory_file, plan)
        return await self._view(live)

    async def restore(self, ref: str) -> Instance:
        live = self._resolve(ref)
        async with self._mutating(live):
            state, _ = await self._state(live)
            if state is not InstanceState.STANDBY:
                raise InvalidState(f"cannot restore instance {live.record.name} from state {state.value}")
            await self._restore_locked(live)
        return await self._view(live)

    async def _restore_locked(self, live: _Live) -> None:
        """Bring a Standby instance back; on failure it stays Standby and can be retried."""
        paths = live.paths
        await self.compression.cancel_for_instance(live.record.id)
        await asyncio.to_thread(ensure_raw_memory, paths.memory_file)
        standby = await asyncio.to_thread(_load_standby, paths)
        await asyncio.to_thread(verify_file, paths.state_file, standby.state_digest)
        memory_size = (await asyncio.to_thread(paths.memory_file.stat)).st_size
        if memory_size != standby.memory_size:
            raise SnapshotCorrupt(
                f"instance {live.record.name}: the saved RAM file is {memory_size} bytes, "
                f"{standby.memory_size} were saved"
            )
        await self._image_of(live)
        self._oplog(live, "restore requested")
        async with self._admitted(live):
            handle = await self.hypervisor.restore(paths.directory, paths.state_file)
        # Running again: the saved VM is used up. Remove the record first, so that a crash in
        # between leaves a running VM and a stale state file, never a second claim to Standby.
        live.handle = handle
        live.exit_seen_at = None
        live.clock_stale = True
        self._forget_status(live)
        await asyncio.to_thread(_remove_standby_files, paths)
        now = utcnow()
        await self._update(live, stopped_at=None, exit=None, **_phase_change(live.record, "running", now))
        live.watcher = asyncio.create_task(self._watch(live, handle), name=f"watch-{live.record.id}")
        self._oplog(live, f"restore: VMM pid {handle.pid} running")
        if live.record.identity_pending:
            await self._new_identity(live)
        # The clock is set in the background: the VM already runs, and the agent's reconnect
        # after a restore must not hold the answer back.
        live.reconnect = self._spawn(self._after_restore(live), f"reconnect-{live.record.id}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _after_restore(self, live: _Live) -> None:
        """Reconnect the agent (which sets the clock) now rather than at the first exec."""
        if live.record.skip_guest_agent:
            return
        try:
            async with asyncio.timeout(AGENT_CONNECT_TIMEOUT):
                await self._agent(live)
        except (DomainError, TimeoutError) as exc:
            log.warning("instance %s: could not set the clock after restore: %s", live.record.id, exc)

    async def _resume_standby_compression(self, live: _Live) -> None:
        """A standby whose memory compression the last server did not finish: start it again
        (the raw file goes only once the compressed copy is durable, so it is still there)."""
        paths = live.paths
        if live.handle is not None or not paths.standby_record.exists():
            return
        try:
            standby = await asyncio.to_thread(_load_standby, paths)
        except SnapshotCorrupt:
            return
        if standby.compression is not None and await asyncio.to_thread(paths.memory_file.exists):
            plan = standby.compression.model_copy(update={"delay_seconds": 0.0})
            self.compression.start_for_instance(live.record.id, paths.memory_file, plan)

    async def _finish_interrupted(self, live: _Live) -> None:
        """At server start: a VMM left paused by a standby, restore or snapshot that the last
        server did not finish. Finish or undo it, so the instance is in one true state."""
        handle = live.handle
        assert handle is not None
        status = await handle.status(timeout=5.0)
        paths = live.paths
        saved = paths.standby_record.exists()
        if status in (VMStatus.POSTMIGRATE, VMStatus.FINISH_MIGRATE) and saved:
            log.warning("instance %s: finishing an interrupted standby", live.record.id)
            live.handle = None
            await self.hypervisor.end_saved(handle)
            now = utcnow()
            await self._update(live, stopped_at=now, **_phase_change(live.record, "standby", now))
        elif status in (VMStatus.INMIGRATE, VMStatus.PRELAUNCH) and saved:
            log.warning("instance %s: undoing an interrupted restore", live.record.id)
            live.handle = None
            await handle.kill(keep_memory=True)
            await handle.close()
        elif status in (VMStatus.POSTMIGRATE, VMStatus.FINISH_MIGRATE, VMStatus.PAUSED):
            log.warning("instance %s: resuming a VM an interrupted operation left paused", live.record.id)
            with contextlib.suppress(DomainError):
                await handle.resume()
            await asyncio.to_thread(_remove_standby_files, paths)
        elif status is VMStatus.RUNNING and saved:
            # A restore that got as far as running: the saved files are used up.
            await asyncio.to_thread(_remove_standby_files, paths)
        if live.handle is not None and live.record.identity_pending:
            # A fork whose new identity was not given yet: give it now, before it is Running.
            log.warning("instance %s: completing an interrupted fork", live.record.id)
            live.clock_stale = True
            self._spawn(self._complete_identity(live), f"identity-{live.record.id}")

    # ---- snapshots: capture, restore in place, fork ---------------------------------------------

    async def capture(self, ref: str, kind: SnapshotKind, guest_dir: Path) -> InstanceRecord:
        """Copy what a snapshot of ``kind`` holds into ``guest_dir`` (sparse copies), under the
        instance's lock. A Running source is paused only while its device state is saved and
        its RAM and overlay are copied, then always continues."""
        live = self._resolve(ref)
        async with self._mutating(live):
            state, _ = await self._state(live)
            paths = live.paths
            await asyncio.to_thread(guest_dir.mkdir, parents=True, exist_ok=True)
            if kind == "Standby":
                if state is InstanceState.RUNNING:
                    handle = live.handle
                    assert handle is not None
                    await self.hypervisor.save_state(handle, guest_dir / STATE_FILE)
                    try:
                        # Not fsynced while the guest is paused: durability comes after it runs.
                        await asyncio.to_thread(
                            _copy_saved_vm, paths.directory, guest_dir, with_memory=True, with_state=False,
                            durable=False,
                        )
                    finally:
                        # Always back to Running, whether the copy worked or not.
                        await handle.resume()
                        self._forget_status(live)
                    await asyncio.to_thread(make_durable, guest_dir)
                    self._oplog(live, "snapshot (Standby) taken while running")
                elif state is InstanceState.STANDBY:
                    await self.compression.cancel_for_instance(live.record.id)
                    await asyncio.to_thread(ensure_raw_memory, paths.memory_file)
                    await asyncio.to_thread(
                        _copy_saved_vm, paths.directory, guest_dir, with_memory=True, with_state=True
                    )
                    self._oplog(live, "snapshot (Standby) taken from standby")
                else:
                    raise InvalidState(
                        f"a Standby snapshot needs its source Running or Standby; "
                        f"{live.record.name} is {state.value}"
                    )
            else:
                if state is not InstanceState.STOPPED:
                    raise InvalidState(
                        f"a Stopped snapshot needs its source Stopped; {live.record.name} is {state.value}"
                    )
                await asyncio.to_thread(
                    _copy_saved_vm, paths.directory, guest_dir, with_memory=False, with_state=False
                )
                self._oplog(live, "snapshot (Stopped) taken")
            return live.record.model_copy(deep=True)

    async def restore_snapshot(
        self, ref: str, source: SavedVM, target: InstanceState, board: Board | None
    ) -> Instance:
        """Replace an instance's disks (and saved VM) with a snapshot's, then bring it to
        ``target``. The instance must not be running."""
        live = self._resolve(ref)
        async with self._mutating(live):
            state, _ = await self._state(live)
            if state in (InstanceState.RUNNING, InstanceState.INITIALIZING):
                raise InvalidState(
                    f"instance {live.record.name} is {state.value}; stop it or put it in standby before "
                    "restoring a snapshot into it"
                )
            handle = live.handle
            if handle is not None:
                live.handle = None
                await self._close_agent(live)
                if handle.is_alive():
                    await handle.kill()
                await handle.close()
            await self.compression.cancel_for_instance(live.record.id)
            paths = live.paths
            await asyncio.to_thread(_replace_saved_vm, source.guest_dir, paths, source.kind)
            console = await asyncio.to_thread(_size_of, paths.console_log)
            now = utcnow()
            record = source.record.model_copy(
                update={
                    "id": live.record.id,
                    "name": live.record.name,
                    "created_at": live.record.created_at,
                    "expires_at": live.record.expires_at,
                    "board": board or source.record.board,
                    "provisioned": True,
                    "started_at": None,
                    "stopped_at": now,
                    "exit": None,
                    "console_offset": console,
                    "phase": live.record.phase,
                    "phase_since": live.record.phase_since,
                    "phase_ms": live.record.phase_ms,
                }
            )
            live.record = record
            live.scanner = ConsoleScanner(paths.console_log, console)
            saved_phase = "standby" if source.kind == "Standby" else "stopped"
            await self._update(live, **_phase_change(record, saved_phase, now))
            self._oplog(live, f"restored from snapshot {source.snapshot_id} ({source.kind})")
            await self._bring_to(live, source, target)
        return await self._view(live)

    async def fork(self, source: SavedVM, name: str, target: InstanceState, board: Board | None) -> Instance:
        """A new instance from a saved VM: its own id, name, MAC, overlay copy and agent channel;
        a Standby fork maps the snapshot's RAM file copy-on-write and gets fresh randomness
        before it is reported Running."""
        try:
            validate_name(name)
        except ValueError as exc:
            raise BadRequest(f"name: {exc}", code="invalid_name") from None
        instance_id = new_instance_id()
        async with self._admission:
            if name in self._reserved_names or any(live.record.name == name for live in self._live.values()):
                raise Conflict(f"an instance named {name!r} already exists", code="name_conflict")
            self._reserved_names.add(name)
        paths = self.layout.instance(instance_id)
        try:
            await asyncio.to_thread(_copy_for_fork, source.guest_dir, paths, source.kind)
            if source.kind == "Standby":
                await asyncio.to_thread(
                    self.hypervisor.prepare_fork, paths.directory, ForkIdentity(vm_id=instance_id)
                )
            now = utcnow()
            record = source.record.model_copy(
                update={
                    "id": instance_id,
                    "name": name,
                    "created_at": now,
                    "expires_at": None,
                    "board": board or source.record.board,
                    "mac": guest_mac(instance_id),
                    "provisioned": True,
                    "started_at": None,
                    "stopped_at": now,
                    "exit": None,
                    "console_offset": 0,
                    "program_started_at": None,
                    "agent_ready_at": None,
                    "identity_pending": source.kind == "Standby",
                    "phase": "standby" if source.kind == "Standby" else "stopped",
                    "phase_since": now,
                    "phase_ms": {},
                }
            )
            live = _Live(record=record, paths=paths)
            live.scanner = ConsoleScanner(paths.console_log, 0)
            await self._save(live)
            self._live[instance_id] = live
            self._oplog(live, f"forked from snapshot {source.snapshot_id} of {source.record.name}")
            async with self._mutating(live):
                await self._bring_to(live, source, target)
        except BaseException:
            await self._discard(instance_id, paths)
            raise
        finally:
            self._reserved_names.discard(name)
        return await self._view(live)

    async def _bring_to(self, live: _Live, source: SavedVM, target: InstanceState) -> None:
        """From a freshly copied saved VM (Standby kind) or disk (Stopped kind) to ``target``."""
        paths = live.paths
        if source.kind == "Standby":
            standby = StandbyRecord(
                created_at=utcnow(),
                state_digest=source.state_digest or "",
                memory_size=(await asyncio.to_thread(paths.memory_file.stat)).st_size,
                qemu_version=source.qemu_version,
            )
            await asyncio.to_thread(write_model_atomic, paths.standby_record, standby)
            if target is InstanceState.RUNNING:
                await self._restore_locked(live)
            elif target is InstanceState.STOPPED:
                await asyncio.to_thread(_remove_standby_files, paths)
                await asyncio.to_thread(paths.memory_file.unlink, missing_ok=True)
                await self._update(live, **_phase_change(live.record, "stopped", utcnow()))
        elif target is InstanceState.RUNNING:
            image = await self._image_of(live)
            async with self._admitted(live):
                await self._boot(live, image)

    async def _complete_identity(self, live: _Live) -> None:
        try:
            async with self._mutating(live):
                if live.handle is not None and live.record.identity_pending:
                    await self._new_identity(live)
        except (DomainError, TimeoutError) as exc:
            log.error("instance %s: could not complete the fork's identity: %s", live.record.id, exc)

    async def _new_identity(self, live: _Live) -> None:
        """A fork resumed the source's memory: give its kernel fresh randomness, its NIC the
        fork's MAC and its hostname the fork's name, then (only then) call it Running."""
        if not live.record.skip_guest_agent:
            async with asyncio.timeout(AGENT_CONNECT_TIMEOUT * 3):
                agent = await self._agent(live)
                await agent.set_identity(
                    os.urandom(64),
                    mac=live.record.mac if live.record.network_enabled else None,
                    hostname=live.record.name,
                )
        now = utcnow()
        await self._update(live, program_started_at=now, agent_ready_at=now, identity_pending=False)
        self._oplog(live, "fork identity set: RNG reseeded from host entropy, MAC and hostname changed")

    # ---- the guest agent and logs (exec, cp, stat, logs) --------------------------------------

    async def guest_agent(self, ref: str, wait_for_agent: float = 0.0) -> AgentClient:
        """The connected agent of a Running instance (waiting up to ``wait_for_agent`` seconds
        for it to become Running)."""
        live = self._resolve(ref)
        deadline = time.monotonic() + max(0.0, min(wait_for_agent, MAX_WAIT))
        while True:
            state, _ = await self._state(live)
            if state is InstanceState.RUNNING:
                break
            if time.monotonic() >= deadline or state in TERMINAL_FOR_WAIT:
                raise InvalidState(f"instance {live.record.name} is {state.value}, not Running")
            await asyncio.sleep(WAIT_POLL)
        return await self._agent(live)

    async def _agent(self, live: _Live) -> AgentClient:
        """The instance's agent connection, made when first needed. After a restore the guest's
        wall clock stood still while it slept: it is set before anyone gets the agent."""
        async with live.agent_lock:
            agent = await self._connected_agent(live)
            if live.clock_stale:
                await agent.set_clock()
                live.clock_stale = False
            return agent

    async def _connected_agent(self, live: _Live) -> AgentClient:
        if live.agent is not None and live.agent.connected:
            return live.agent
        handle = live.handle
        if handle is None or not handle.is_alive():
            raise InvalidState(f"instance {live.record.name} is Stopped, not Running")
        if live.agent is not None:
            await live.agent.close()
            live.agent = None
        try:
            live.agent = await AgentClient.connect(
                handle.agent_socket_path, timeout=AGENT_CONNECT_TIMEOUT
            )
        except AgentError as exc:
            if not handle.is_alive():
                raise InvalidState(f"instance {live.record.name} is Stopped, not Running") from exc
            raise
        return live.agent

    async def _close_agent(self, live: _Live) -> None:
        reconnect, live.reconnect = live.reconnect, None
        if reconnect is not None and reconnect is not asyncio.current_task():
            # A reconnect after a restore must not finish after the VM it connects to is gone.
            reconnect.cancel()
            await asyncio.gather(reconnect, return_exceptions=True)
        agent, live.agent = live.agent, None
        if agent is not None:
            await agent.close()

    async def log_file(self, ref: str, source: str) -> Path:
        live = self._resolve(ref)
        files = {
            "app": live.paths.console_log,
            "vmm": live.paths.vmm_log,
            "hypeman": live.paths.operations_log,
        }
        if source not in files:
            raise BadRequest(f"unknown log source {source!r}; use app, vmm or hypeman")
        return files[source]

    # ---- expiry -----------------------------------------------------------------------------------

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = utcnow()
            for live in list(self._live.values()):
                expires = live.record.expires_at
                if expires is not None and expires <= now and not live.deleted and not live.lock.locked():
                    log.info(
                        "instance %s (%s) expired at %s: deleting", live.record.name, live.record.id, expires
                    )
                    try:
                        await self.delete(live.record.id)
                    except DomainError as exc:
                        log.warning("instance %s: expiry delete failed: %s", live.record.id, exc)

    # ---- record keeping -----------------------------------------------------------------------------

    async def _update(self, live: _Live, **changes: Any) -> None:
        async with live.write_lock:
            if live.deleted:
                return  # its directory is gone: writing would bring it back
            record = live.record.model_copy(update=changes)
            await asyncio.to_thread(write_model_atomic, live.paths.record, record)
            live.record = record

    async def _save(self, live: _Live) -> None:
        async with live.write_lock:
            await asyncio.to_thread(write_model_atomic, live.paths.record, live.record)

    def _oplog(self, live: _Live, message: str) -> None:
        """The instance's operations log (``logs?source=hypeman``): a line per thing the server did."""
        line = f"{utcnow().isoformat(timespec='milliseconds')} {message}\n"
        if live.deleted:
            return
        try:
            log_path = live.paths.operations_log
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as oplog:
                oplog.write(line)
        except OSError as exc:
            log.warning("instance %s: cannot write its operations log: %s", live.record.id, exc)


def _booted(markers: ConsoleMarkers, record: InstanceRecord) -> bool:
    """The program started (and its agent answered, unless skipped) in this VM's life: seen on
    this boot's console, or recorded (a restored VM continues a life whose markers were seen)."""
    program = markers.program_start_ts is not None or record.program_started_at is not None
    agent = markers.agent_ready_ts is not None or record.agent_ready_at is not None
    return program and (record.skip_guest_agent or agent)


def _phase_change(record: InstanceRecord, phase: str, at: datetime) -> dict[str, Any]:
    spent = max(0, int((at - record.phase_since).total_seconds() * 1000))
    phase_ms = dict(record.phase_ms)
    phase_ms[record.phase] = phase_ms.get(record.phase, 0) + spent
    return {"phase": phase, "phase_since": at, "phase_ms": phase_ms}


def _size(text: str, field_name: str, code: str) -> int:
    try:
        return parse_size(text)
    except UnitError as exc:
        raise BadRequest(f"{field_name}: {exc}", code=code) from None


def _expiry(ttl: str | None, expires_at: datetime | None) -> datetime | None:
    if ttl is not None:
        try:
            seconds = parse_duration(ttl)
        except UnitError as exc:
            raise BadRequest(f"ttl: {exc}", code="invalid_ttl") from None
        try:
            return None if seconds == 0 else utcnow() + timedelta(seconds=seconds)
        except OverflowError:
            raise BadRequest(f"ttl {ttl!r} reaches past the year 9999", code="invalid_ttl") from None
    if expires_at is not None:
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= utcnow():
            raise BadRequest("expires_at must be in the future", code="invalid_expires_at")
        return expires_at
    return None


def _load_record(path: Path) -> InstanceRecord | None:
    try:
        return InstanceRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None


def _mtime(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return utcnow()


def _remove_standby_files(paths: InstancePaths) -> None:
    """Forget a saved VM's device state (its RAM file stays: it is the VM's RAM)."""
    paths.standby_record.unlink(missing_ok=True)
    paths.state_file.unlink(missing_ok=True)


def _load_standby(paths: InstancePaths) -> StandbyRecord:
    try:
        return StandbyRecord.model_validate_json(paths.standby_record.read_bytes())
    except FileNotFoundError:
        raise SnapshotCorrupt(f"{paths.directory.name}: the standby record is missing") from None
    except ValueError as exc:
        raise SnapshotCorrupt(f"{paths.directory.name}: the standby record is unreadable: {exc}") from None


@dataclass(frozen=True)
class SavedVM:
    """A snapshot's payload as the instance domain needs it (the snapshot domain owns the rest)."""

    snapshot_id: str
    kind: SnapshotKind
    guest_dir: Path
    record: InstanceRecord
    state_digest: str | None
    qemu_version: str


_SAVED_DISKS = (OVERLAY_DISK, CONFIG_DISK, LAUNCH_RECORD)


def _copy_saved_vm(
    directory: Path, guest_dir: Path, *, with_memory: bool, with_state: bool, durable: bool = True
) -> None:
    """Blocking: sparse copies (reflink where the filesystem can) of what a snapshot holds."""
    for name in _SAVED_DISKS:
        if (directory / name).exists():
            copy_sparse(directory / name, guest_dir / name, durable=durable)
    if with_memory:
        copy_sparse(directory / MEMORY_FILE, guest_dir / MEMORY_FILE, durable=durable)
    if with_state:
        copy_sparse(directory / STATE_FILE, guest_dir / STATE_FILE, durable=durable)


def _replace_saved_vm(guest_dir: Path, paths: InstancePaths, kind: str) -> None:
    """Blocking: an instance's disks and saved VM become copies of a snapshot's. The instance
    will write to them (its RAM file is mapped shared), so nothing is linked."""
    for name in (*_SAVED_DISKS, MEMORY_FILE, STATE_FILE, STANDBY_RECORD):
        (paths.directory / name).unlink(missing_ok=True)
    for name in _SAVED_DISKS:
        if (guest_dir / name).exists():
            copy_sparse(guest_dir / name, paths.directory / name)
    if kind == "Standby":
        copy_sparse(guest_dir / MEMORY_FILE, paths.memory_file)
        copy_sparse(guest_dir / STATE_FILE, paths.state_file)


def _copy_for_fork(guest_dir: Path, paths: InstancePaths, kind: str) -> None:
    """Blocking: a fork's own writable disks are copies; its RAM file is a hard link to the
    snapshot's, mapped privately (share=off) by the fork, so the file is never written and ten
    forks share one copy on disk and in the page cache."""
    paths.directory.mkdir(parents=True)
    paths.console_log.parent.mkdir(parents=True, exist_ok=True)
    for name in _SAVED_DISKS:
        if (guest_dir / name).exists():
            copy_sparse(guest_dir / name, paths.directory / name)
    if kind == "Standby":
        link_or_copy(guest_dir / MEMORY_FILE, paths.memory_file)
        copy_sparse(guest_dir / STATE_FILE, paths.state_file)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _normalized_policy(policy: SnapshotPolicy | None) -> SnapshotPolicy | None:
    """Checked at create (400 before anything is made) and stored in its normal form."""
    if policy is None:
        return None
    compression = policy.compression
    if compression is not None:
        normal = normalize(compression)
        compression = SnapshotCompressionConfig(
            enabled=normal is not None,
            algorithm=normal.algorithm if normal else None,
            level=normal.level if normal else None,
        )
    if policy.standby_compression_delay is not None:
        try:
            parse_duration(policy.standby_compression_delay)
        except UnitError as exc:
            message = f"snapshot_policy.standby_compression_delay: {exc}"
            raise BadRequest(message, code="invalid_request") from None
    return policy.model_copy(update={"compression": compression})
