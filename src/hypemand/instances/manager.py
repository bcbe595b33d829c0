"""The instance manager: the one owner of every instance's directory, record and VM, and the
façade the API, the snapshot domain and the CLI call.

Everything that changes an instance goes through here, under that instance's lock; reads never
take it. The work is done by collaborators that share the :class:`LiveInstance` objects:
``state`` (derivation, never stored), ``admission`` (names and capacity), ``validation``
(what a create asks for), ``lifecycle`` (boot, watch, stop, start, delete), ``saved``
(standby, restore, capture, fork, identity), ``agents`` (the guest agent links) and
``records`` (the stored record and the operations log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from hypemand.errors import BadRequest, Conflict, DomainError, InvalidState, NotFound
from hypemand.guest.client import AgentClient
from hypemand.guest.config_disk import make_overlay_disk
from hypemand.hypervisor.base import Board, Hypervisor, VMHandle
from hypemand.hypervisor.qemu_cmdline import guest_mac
from hypemand.images.errors import ImageNotFound
from hypemand.images.models import ReadyImage
from hypemand.images.service import ImageService
from hypemand.instances import records
from hypemand.instances.admission import Admission, Demand, DiskClaim, claim_of
from hypemand.instances.agents import AgentLinks
from hypemand.instances.events import EventKind, InstanceEvent, InstanceEvents
from hypemand.instances.host import HostCapacity, host_capacity, process_usage
from hypemand.instances.lifecycle import Lifecycle
from hypemand.instances.live import InstanceTable, LiveInstance, mutating
from hypemand.instances.models import (
    AttachVolumeRequest,
    CreateInstanceRequest,
    Instance,
    InstanceRecord,
    InstanceState,
    InstanceStats,
    StandbyInstanceRequest,
    StartInstanceRequest,
    UpdateInstanceRequest,
    VolumeMountRecord,
    VolumeMountRequest,
    WaitForStateResponse,
    validate_name,
)
from hypemand.instances.networking import Networking
from hypemand.instances.records import OperationsLog, load_record, utcnow
from hypemand.instances.saved import SavedVM, SavedVMOperations, SnapshotKind
from hypemand.instances.state import Observed, StateReader, StateWatch
from hypemand.instances.validation import (
    BOARDS,
    expiry,
    merged_env,
    new_instance_id,
    normalized_policy,
    validate_create,
)
from hypemand.instances.volumes import (
    Attachments,
    MountWish,
    VolumeCatalog,
    plan_mount,
    require_readonly,
)
from hypemand.layout import DataLayout, InstancePaths
from hypemand.network import InstanceAddress, NetworkHost
from hypemand.policies.models import RestartStatus
from hypemand.savedvm.files import SavedVMFiles
from hypemand.savedvm.jobs import CompressionJobs
from hypemand.system.files import SystemFiles
from hypemand.units import format_size
from hypemand.volumes.models import VolumeAttachment

log = logging.getLogger(__name__)

MAX_WAIT = 300.0
SWEEP_INTERVAL = 1.0
# How long a create waits for an image that is still being pulled: within the official SDK's
# default 60 s request timeout, so a client never gives up on a create the server goes on with.
IMAGE_WAIT = 50.0
TERMINAL_FOR_WAIT = {InstanceState.STOPPED, InstanceState.STANDBY}


class InstanceManager:
    def __init__(
        self,
        layout: DataLayout,
        hypervisor: Hypervisor,
        images: ImageService,
        system: Callable[[], SystemFiles],
        compression: CompressionJobs,
        platform: str = "linux/amd64",
        network_host: NetworkHost | None = None,
        user_mode_reason: str = "no bridge network configured",
    ) -> None:
        self.layout = layout
        self.hypervisor = hypervisor
        self.images = images
        self.compression = compression
        self.platform = platform
        self.table = InstanceTable()
        self.reader = StateReader()
        self.watch = StateWatch(self.reader)
        self.agents = AgentLinks()
        self.oplog = OperationsLog()
        # What happened to each instance, for the policies (hypemand/policies) to act on.
        self.events = InstanceEvents()
        self.network = Networking(
            self.table, network_host.config if network_host else None, network_host, user_mode_reason
        )
        self.admission = Admission(self.table, self.capacity, hypervisor.writes_memory_file)
        # Volumes attached to instances (the volume service is given by use_volumes).
        self.attachments = Attachments(self.table)
        self.lifecycle = Lifecycle(
            table=self.table,
            hypervisor=hypervisor,
            images=images,
            system=system,
            admission=self.admission,
            reader=self.reader,
            agents=self.agents,
            oplog=self.oplog,
            compression=compression,
            network=self.network,
            attachments=self.attachments,
            events=self.events,
        )
        self.saved = SavedVMOperations(
            table=self.table,
            hypervisor=hypervisor,
            lifecycle=self.lifecycle,
            admission=self.admission,
            reader=self.reader,
            agents=self.agents,
            oplog=self.oplog,
            compression=compression,
            network=self.network,
            spawn=self._spawn,
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def use_volumes(self, catalog: VolumeCatalog) -> None:
        """The volume service: where volumes are found, their disks and their locks."""
        self.attachments.catalog = catalog

    def attachments_of(self, volume_id: str) -> list[VolumeAttachment]:
        """The volume's attachments, from the records in memory (the volume service's
        ``AttachmentDirectory``): synchronous, never waits."""
        return self.attachments.attachments_of(volume_id)

    # ---- the manager's own lifecycle --------------------------------------------------------------

    async def take_charge(self) -> None:
        """Take charge of every instance in the data directory: adopt VMs that outlived the last
        server, finish the bookkeeping of those that ended meanwhile, and remove what a create
        that died half-way left behind."""
        self.images.content_in_use = self.admission.image_in_use
        guests = self.layout.guests
        await asyncio.to_thread(guests.mkdir, parents=True, exist_ok=True)
        # First, QEMUs that a server which died before recording them left running.
        for orphan in await self.hypervisor.reap_orphans(guests):
            log.warning("ended an orphaned VMM: %s", orphan)
        for directory in sorted(await asyncio.to_thread(lambda: [p for p in guests.iterdir() if p.is_dir()])):
            await self._take_charge(InstancePaths(directory))
        # The network once every VM is known: TAPs of VMs that no longer run are strays.
        await self.network.start({live.id for live in self.table if live.handle is not None})
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="instance-expiry")

    async def _take_charge(self, paths: InstancePaths) -> None:
        try:
            record = await asyncio.to_thread(load_record, paths.record)
        except ValueError as exc:
            # Records are written atomically, so this is damage from outside: keep the files.
            log.error(
                "instance directory %s has an unreadable record, leaving it alone: %s", paths.directory, exc
            )
            return
        deleting = await asyncio.to_thread(paths.delete_intent.exists)
        if record is None or not record.provisioned or deleting:
            # A create or fork that died before it answered (nothing of it was promised), or a
            # delete that a killed server began: finish removing it.
            why = "deleted" if deleting else "half-created"
            handle = await self.hypervisor.adopt(paths.directory)
            if handle is not None:
                log.warning(
                    "removing %s instance %s: ending its VMM (pid %d)", why, paths.directory.name, handle.pid
                )
                await handle.kill()
                await handle.close()
            else:
                log.warning("removing %s instance %s", why, paths.directory.name)
            await asyncio.to_thread(shutil.rmtree, paths.directory, ignore_errors=True)
            return
        live = LiveInstance(record=record, paths=paths)
        self.table.add(live)
        await self.lifecycle.adopt(live)
        if live.handle is not None:
            await self.saved.finish_interrupted(live)
        await self.saved.resume_standby_compression(live)

    async def release_all(self) -> None:
        """Drop the server's connections. VMs keep running: they outlive the server."""
        tasks = [t for t in (self._sweeper, *self._tasks) if t is not None]
        tasks += [live.watcher for live in self.table if live.watcher is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.watch.close()
        await self.oplog.close()
        self.network.close()
        for live in self.table:
            await self.agents.close(live)
            if live.handle is not None:
                await live.handle.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- reads ------------------------------------------------------------------------------------

    def record_of(self, ref: str) -> InstanceRecord:
        return self.table.resolve(ref).record

    async def get(self, ref: str) -> Instance:
        return await self.reader.view(self.table.resolve(ref))

    async def list_instances(
        self, state: InstanceState | None = None, tags: dict[str, str] | None = None
    ) -> list[Instance]:
        lives = [
            live
            for live in sorted(self.table, key=lambda item: (item.record.created_at, item.id))
            if all(live.record.tags.get(k) == v for k, v in (tags or {}).items())
        ]
        views = await asyncio.gather(*(self.reader.view(live) for live in lives))
        return [view for view in views if state is None or view.state == state]

    async def wait(self, ref: str, target: InstanceState, timeout: float) -> WaitForStateResponse:  # noqa: ASYNC109
        live = self.table.resolve(ref)

        def reached(observed: Observed) -> bool:
            state = observed.state
            return state is target or (state in TERMINAL_FOR_WAIT and target not in TERMINAL_FOR_WAIT)

        observed, timed_out = await self.watch.until(live, reached, min(max(timeout, 0.0), MAX_WAIT))
        if live.deleted:
            raise NotFound(f"instance {ref!r} was deleted")
        return WaitForStateResponse(state=observed.state, timed_out=timed_out, state_error=observed.error)

    async def stats(self, ref: str) -> InstanceStats:
        live = self.table.resolve(ref)
        handle = live.handle
        usage = await asyncio.to_thread(process_usage, handle.pid) if handle is not None else None
        state = (await self.reader.state(live)).state
        if usage is None:
            raise InvalidState(f"instance {live.name} is {state.value}; stats need a running VM")
        rx, tx = await self.agents.network_counters(live) if state is InstanceState.RUNNING else (0, 0)
        allocated = live.record.memory_bytes + live.record.hotplug_bytes
        return InstanceStats(
            instance_id=live.id,
            instance_name=live.name,
            cpu_seconds=usage.cpu_seconds,
            memory_rss_bytes=usage.rss_bytes,
            memory_vms_bytes=usage.vms_bytes,
            network_rx_bytes=rx,
            network_tx_bytes=tx,
            allocated_vcpus=live.record.vcpus,
            allocated_memory_bytes=allocated,
            memory_utilization_ratio=min(1.0, usage.rss_bytes / allocated) if allocated else None,
        )

    def find_address(self, ref: str) -> InstanceAddress | None:
        """The instance with exactly this id or name and the address it holds now (the ingress's
        resolver asks, on the event loop, for every request it routes)."""
        return self.network.find_address(ref)

    def capacity(self) -> HostCapacity:
        return host_capacity(self.layout.root)

    def allocations(self) -> list[tuple[InstanceRecord, bool, DiskClaim]]:
        """Every instance with whether it holds host resources now (a VMM runs) and what it may
        take on the data disk."""
        return [(live.record, live.vmm_alive(), claim_of(live)) for live in self.table]

    @contextlib.asynccontextmanager
    async def locked_vm(self, instance_id: str) -> AsyncIterator[VMHandle | None]:
        """The instance's VMM handle while its lock is held, for a policy acting on the VM itself
        (memory reclaim sets its balloon): no standby, stop or restore swaps the VMM meanwhile.
        None when its VMM does not run; ``NotFound`` once the instance is gone."""
        live = self.table.get(instance_id)
        if live is None:
            raise NotFound(f"instance {instance_id!r} not found")
        async with mutating(live):
            yield live.handle if live.vmm_alive() else None

    async def hypervisor_version(self) -> str:
        """The VMM version saved VMs are recorded with (a restore needs the same one)."""
        return await asyncio.to_thread(self.hypervisor.version)

    def available_boards(self) -> list[Board]:
        return list(BOARDS)

    # ---- create, update, delete ------------------------------------------------------------------

    async def create(self, request: CreateInstanceRequest) -> Instance:
        shape = validate_create(
            request, platform=self.platform, hotplug_memory=self.hypervisor.capabilities().hotplug_memory
        )
        network_enabled = request.network.enabled if request.network else True
        download, upload = (
            self.network.bandwidth(request.network, shape.vcpus, os.cpu_count() or 1)
            if network_enabled else (None, None)
        )
        mounts = self._plan_create_mounts(request, shape.board)
        ready = await self._ready_image(request.image)
        instance_id = new_instance_id()
        paths = self.layout.instance(instance_id)
        # Its overlays (root and volumes') may grow to their full size and its RAM file is
        # backed in full.
        disk = shape.overlay_bytes + shape.memory_demand + sum(m.overlay_bytes for m in mounts)
        demand = Demand(shape.vcpus, shape.memory_demand, ready.digest, disk)
        async with (
            self.admission.new_instance(instance_id, request.name, demand),
            self.attachments.claim(instance_id, mounts),
        ):
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
                    network_enabled=network_enabled,
                    mac=guest_mac(instance_id),
                    bandwidth_download=download,
                    bandwidth_upload=upload,
                    skip_guest_agent=request.skip_guest_agent,
                    snapshot_policy=normalized_policy(request.snapshot_policy),
                    expires_at=shape.expires_at,
                    created_at=now,
                    phase_since=now,
                    volumes=mounts,
                    health_check=request.health_check,
                    restart_policy=request.restart_policy,
                    auto_standby=request.auto_standby,
                )
                live = LiveInstance(record=record, paths=paths)
                await records.save(live)
                self.oplog.write(
                    live,
                    f"create: image {request.image} ({ready.digest}), {shape.vcpus} vCPUs, "
                    f"{format_size(shape.memory_bytes)} memory, hypervisor {shape.board.value}",
                )
                await self.lifecycle.boot(live, ready)
            except BaseException:
                await self.lifecycle.discard(instance_id, paths.directory)
                raise
        self.events.emit(InstanceEvent(EventKind.CREATED, live.id))
        return await self.reader.view(live)

    def _plan_create_mounts(self, request: CreateInstanceRequest, board: Board) -> list[VolumeMountRecord]:
        """The attachments a create asks for, checked (400 paths, overlay, count; 404 volume)."""
        mounts: list[VolumeMountRecord] = []
        for wish in request.volumes or []:
            volume = self.attachments.resolve(wish.volume_id)
            mounts.append(plan_mount(_wish(wish), volume.id, mounts, board))
        return mounts

    async def _ready_image(self, name: str) -> ReadyImage:
        """The image to boot: pulled first if this server does not have it, and waited for
        while it is being pulled (a client may create an instance right after asking for the
        image, as Harbor's does). A failed or unfinished pull is a 409 ``image_not_ready``."""
        try:
            return await self.images.ready_for_boot(name, IMAGE_WAIT)
        except ImageNotFound as exc:
            raise NotFound(f"image {name!r} not found: {exc}") from exc

    async def update(self, ref: str, request: UpdateInstanceRequest) -> Instance:
        live = self.table.resolve(ref)
        async with mutating(live):
            changes: dict[str, Any] = {}
            # Each policy given replaces the stored one.
            for policy in ("health_check", "auto_standby"):
                if policy in request.model_fields_set:
                    changes[policy] = getattr(request, policy)
            if "restart_policy" in request.model_fields_set:
                changes["restart_policy"] = request.restart_policy
                # A new policy starts with a clean count, but a manual stop still holds.
                status = live.record.restart_status
                if status is None or status.blocked_reason != "manual_stop":
                    changes["restart_status"] = None
            if request.env is not None:
                changes["env"] = merged_env(live.record.env, request.env)
            if request.ttl is not None or request.expires_at is not None:
                current = live.record.expires_at
                if current is not None and current <= utcnow():
                    raise Conflict(f"instance {live.name} has already expired", code="expired")
                changes["expires_at"] = expiry(request.ttl, request.expires_at)
            if changes:
                await records.update(live, **changes)
                self.oplog.write(live, f"update: {', '.join(sorted(changes))}")
        return await self.reader.view(live)

    async def attach_volume(self, ref: str, volume_ref: str, request: AttachVolumeRequest) -> Instance:
        """Attach a volume to a Stopped instance (its disks are on the command line of a running
        VM, a standby and a snapshot, so only a fresh boot takes a change)."""
        live = self.table.resolve(ref)
        volume = self.attachments.resolve(volume_ref)
        wish = MountWish(
            volume.id, request.mount_path, request.readonly, request.overlay, request.overlay_size
        )
        async with mutating(live):
            await self._require_stopped(live, "attach a volume to")
            mount = plan_mount(wish, volume.id, live.record.volumes, live.record.board)
            async with self.attachments.locked([volume.id]):
                self.attachments.check_shareable([mount], live.id)
                if mount.overlay:
                    upper = live.paths.volume_overlay(volume.id)
                    await asyncio.to_thread(_fresh_upper_disk, upper, mount.overlay_bytes)
                await records.update(live, volumes=[*live.record.volumes, mount])
            mode = "overlay" if mount.overlay else "read-only" if mount.readonly else "read-write"
            self.oplog.write(
                live, f"volume {volume.name} ({volume.id}) attached {mode} at {mount.mount_path}"
            )
        return await self.reader.view(live)

    async def detach_volume(self, ref: str, volume_ref: str) -> Instance:
        """Detach a volume from a Stopped instance; an overlay volume's private upper disk goes
        with the attachment. The volume itself is kept."""
        live = self.table.resolve(ref)
        async with mutating(live):
            mounts = live.record.volumes
            found = [m for m in mounts if m.volume_id == volume_ref]
            if not found:
                try:
                    volume_id = self.attachments.resolve(volume_ref).id
                except NotFound:
                    volume_id = volume_ref
                found = [m for m in mounts if m.volume_id == volume_id]
            if not found:
                raise NotFound(f"volume {volume_ref!r} is not attached to instance {live.name}")
            await self._require_stopped(live, "detach a volume from")
            mount = found[0]
            await records.update(live, volumes=[m for m in mounts if m.volume_id != mount.volume_id])
            if mount.overlay:
                await asyncio.to_thread(live.paths.volume_overlay(mount.volume_id).unlink, missing_ok=True)
            self.oplog.write(live, f"volume {mount.volume_id} detached from {mount.mount_path}")
        return await self.reader.view(live)

    async def _require_stopped(self, live: LiveInstance, what: str) -> None:
        state = (await self.reader.state(live)).state
        if state is not InstanceState.STOPPED:
            raise InvalidState(
                f"instance {live.name} is {state.value}: stop it to {what} it (volumes are attached "
                "and detached only while an instance is Stopped)"
            )

    def require_readonly_volumes(self, ref: str, what: str) -> None:
        """Snapshots and forks only of instances whose attachments are all read-only (409)."""
        live = self.table.resolve(ref)
        require_readonly(live.name, live.record.volumes, what)

    async def delete(self, ref: str, graceful: bool = False) -> None:
        live = self.table.resolve(ref)
        async with mutating(live):
            await self.lifecycle.delete(live, graceful=graceful)
        self.events.emit(InstanceEvent(EventKind.DELETED, live.id))

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def stop(self, ref: str, *, manual: bool = True) -> Instance:
        """``manual``: a client asked. A manual stop blocks automatic restarts until the next
        manual start; the block lands in the same record write as the stop."""
        live = self.table.resolve(ref)
        async with mutating(live):
            changes: dict[str, Any] = {}
            if manual and live.record.restart_policy is not None:
                status = live.record.restart_status or RestartStatus()
                changes["restart_status"] = status.model_copy(
                    update={"blocked_reason": "manual_stop", "next_attempt_at": None})
            await self.lifecycle.stop(live, **changes)
        self.events.emit(InstanceEvent(EventKind.STOPPED, live.id, manual=manual))
        return await self.reader.view(live)

    async def start(self, ref: str, request: StartInstanceRequest, *, manual: bool = True) -> Instance:
        """``manual``: a client asked, which lifts a manual stop's block on restarts and starts
        the attempt count afresh."""
        live = self.table.resolve(ref)
        async with mutating(live):
            await self.lifecycle.start(live, request)
            if manual and live.record.restart_status is not None:
                await records.update(live, restart_status=None)
        self.events.emit(InstanceEvent(EventKind.STARTED, live.id, manual=manual))
        return await self.reader.view(live)

    async def standby(
        self, ref: str, request: StandbyInstanceRequest, *, manual: bool = True,
        precheck: Callable[[], Awaitable[None]] | None = None,
    ) -> Instance:
        """``precheck``: run with the VM paused and saved, just before the standby is committed;
        an exception from it resumes the VM and is raised here (auto-standby's last check)."""
        live = self.table.resolve(ref)
        async with mutating(live):
            await self.saved.standby(live, request, precheck)
        self.events.emit(InstanceEvent(EventKind.STANDBY, live.id, manual=manual))
        return await self.reader.view(live)

    async def restore(self, ref: str, *, manual: bool = True) -> Instance:
        live = self.table.resolve(ref)
        async with mutating(live):
            state = (await self.reader.state(live)).state
            if state is not InstanceState.STANDBY:
                raise InvalidState(f"cannot restore instance {live.name} from state {state.value}")
            await self.saved.restore(live)
        self.events.emit(InstanceEvent(EventKind.RESTORED, live.id, manual=manual))
        return await self.reader.view(live)

    # ---- snapshots: capture, restore in place, fork ---------------------------------------------

    async def capture(self, ref: str, kind: SnapshotKind, target: SavedVMFiles) -> InstanceRecord:
        """Copy what a snapshot of ``kind`` holds into ``target``, under the instance's lock."""
        live = self.table.resolve(ref)
        async with mutating(live):
            require_readonly(live.name, live.record.volumes, "a snapshot or fork")
            return await self.saved.capture(live, kind, target)

    async def restore_snapshot(
        self, ref: str, source: SavedVM, target: InstanceState, board: Board | None
    ) -> Instance:
        live = self.table.resolve(ref)
        # The snapshot's attachments become the instance's: they must still be allowed.
        async with mutating(live), self.attachments.claim(live.id, source.record.volumes):
            await self.saved.restore_snapshot(live, source, target, board)
        self.events.emit(InstanceEvent(EventKind.RESTORED, live.id))
        return await self.reader.view(live)

    async def fork(self, source: SavedVM, name: str, target: InstanceState, board: Board | None) -> Instance:
        try:
            validate_name(name)
        except ValueError as exc:
            raise BadRequest(f"name: {exc}", code="invalid_name") from None
        instance_id = new_instance_id()
        paths = self.layout.instance(instance_id)
        async with (
            self.admission.new_instance(instance_id, name, None),
            self.attachments.claim(instance_id, source.record.volumes),
        ):
            try:
                live = await self.saved.fork_into(paths, name, source, target, board)
            except BaseException:
                await self.lifecycle.discard(instance_id, paths.directory)
                raise
        self.events.emit(InstanceEvent(EventKind.CREATED, live.id))
        return await self.reader.view(live)

    # ---- the guest agent and logs (exec, cp, stat, logs) --------------------------------------

    async def guest_agent(self, ref: str, wait_for_agent: float = 0.0) -> AgentClient:
        """The connected agent of a Running instance (waiting up to ``wait_for_agent`` seconds
        for it to become Running)."""
        live = self.table.resolve(ref)

        def settled(observed: Observed) -> bool:
            return observed.state is InstanceState.RUNNING or observed.state in TERMINAL_FOR_WAIT

        observed, _ = await self.watch.until(live, settled, max(0.0, min(wait_for_agent, MAX_WAIT)))
        if observed.state is not InstanceState.RUNNING:
            raise InvalidState(f"instance {live.name} is {observed.state.value}, not Running")
        return await self.agents.agent(live)

    async def log_file(self, ref: str, source: str) -> Path:
        live = self.table.resolve(ref)
        files = {
            "app": live.paths.console_log,
            "vmm": live.paths.vmm_log,
            "hypeman": live.paths.operations_log,
        }
        if source not in files:
            raise BadRequest(f"unknown log source {source!r}; use app, vmm or hypeman")
        if source == "hypeman":
            await self.oplog.flush()  # a reader sees every line written before it asked
        return files[source]

    # ---- expiry -----------------------------------------------------------------------------------

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = utcnow()
            for live in self.table:
                expires = live.record.expires_at
                if expires is not None and expires <= now and not live.deleted and not live.lock.locked():
                    log.info("instance %s (%s) expired at %s: deleting", live.name, live.id, expires)
                    try:
                        await self.delete(live.id)
                    except DomainError as exc:
                        log.warning("instance %s: expiry delete failed: %s", live.id, exc)
                    except Exception:
                        # The sweep goes on for the other instances (and this one next time).
                        log.exception("instance %s: expiry delete failed", live.id)


def _wish(request: VolumeMountRequest) -> MountWish:
    return MountWish(
        request.volume_id, request.mount_path, request.readonly, request.overlay, request.overlay_size
    )


def _fresh_upper_disk(path: Path, size: int) -> None:
    """Blocking: a new, empty upper disk for an overlay attachment (a left-over one goes)."""
    path.unlink(missing_ok=True)
    make_overlay_disk(path, size, label="hm-vol-upper")
