"""Boot, watch, stop, start and delete: an instance's VMM from launch to exit.

A watcher task per VMM keeps the record's history: it notes when the program started and, when
QEMU ends for whatever reason (program exit, stop, crash, kill from outside), records the exit.
The caller of every method here holds the instance's lock, or owns the instance alone (a create
or fork that has not answered yet).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypemand.errors import Conflict, DomainError, InvalidState, NotFound
from hypemand.fsutil import fsync_dir, is_no_space
from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import ConsoleMarkers
from hypemand.hypervisor.base import Hypervisor, VMHandle, VMMExit, VMStatus, read_vmm_exit
from hypemand.images.errors import ImageNotFound
from hypemand.images.models import ReadyImage
from hypemand.images.service import ImageService
from hypemand.instances import records
from hypemand.instances.admission import Admission
from hypemand.instances.agents import AgentLinks
from hypemand.instances.boot import GuestSpec, launch_guest
from hypemand.instances.console import ConsoleScanner
from hypemand.instances.events import EventKind, InstanceEvent, InstanceEvents
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import GuestExitInfo, InstanceRecord, InstanceState, StartInstanceRequest
from hypemand.instances.networking import Networking
from hypemand.instances.records import OperationsLog, phase_change, utcnow
from hypemand.instances.state import StateReader, booted
from hypemand.instances.volumes import Attachments, VolumeDiskPath, VolumeDisks, volume_disks
from hypemand.layout import InstancePaths
from hypemand.savedvm.jobs import CompressionJobs
from hypemand.system.files import SystemFiles

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.2
# The guest's own grace for the program after the power button (init: SIGTERM, 5 s, SIGKILL);
# the host waits that long plus this before it tells QEMU to quit.
POWEROFF_MARGIN = 2.0
# A guest paused on a full disk is looked at every this many watcher ticks (about a second) and
# resumed once the file system has at least this much free again.
IO_ERROR_CHECK_TICKS = 5
RESUME_MIN_FREE = 64 << 20


def guest_spec(
    record: InstanceRecord,
    image: ReadyImage,
    directory: Path,
    network: Networking,
    volume_disk: VolumeDiskPath | None = None,
) -> GuestSpec:
    """What to boot for ``record``. ``volume_disk``: where a volume's disk lies (the volume
    service's answer), needed when the record has volumes."""
    entrypoint = record.entrypoint if record.entrypoint is not None else (image.entrypoint or [])
    # As in docker run: a new entrypoint drops the image's cmd unless a cmd is given too.
    if record.cmd is not None:
        cmd = record.cmd
    elif record.entrypoint is not None:
        cmd = []
    else:
        cmd = image.cmd or []
    volumes = VolumeDisks()
    if record.volumes:
        if volume_disk is None:
            raise Conflict(f"instance {record.name} has volumes and this server has no volume service")
        volumes = volume_disks(record.volumes, InstancePaths(directory), volume_disk)
    guest = GuestConfig(
        volumes=list(volumes.guest),
        entrypoint=entrypoint,
        cmd=cmd,
        env={**image.env, **record.env},
        working_dir=image.working_dir or "/",
        hostname=record.name,
        network=network.guest_network(record),
    )
    nic = network.nic_of(record)
    return GuestSpec(
        vm_id=record.id,
        directory=directory,
        root_disk=image.disk_path,
        guest=guest,
        board=record.board,
        vcpus=record.vcpus,
        memory_mib=record.memory_bytes >> 20,
        overlay_size_bytes=record.overlay_bytes,
        network=nic is not None,
        tap=nic == "tap",
        mac=record.mac,
        volume_disks=list(volumes.disks),
        volume_uppers=list(volumes.uppers),
        volume_replays=[disk.path for disk in volumes.disks if disk.readonly],
    )


class Lifecycle:
    def __init__(
        self,
        *,
        table: InstanceTable,
        hypervisor: Hypervisor,
        images: ImageService,
        system: Callable[[], SystemFiles],
        admission: Admission,
        reader: StateReader,
        agents: AgentLinks,
        oplog: OperationsLog,
        compression: CompressionJobs,
        network: Networking,
        attachments: Attachments | None = None,
        events: InstanceEvents | None = None,
    ) -> None:
        self.table = table
        self.events = events if events is not None else InstanceEvents()
        self.network = network
        self.attachments = attachments if attachments is not None else Attachments(table)
        self.hypervisor = hypervisor
        self.images = images
        self.system = system
        self.admission = admission
        self.reader = reader
        self.agents = agents
        self.oplog = oplog
        self.compression = compression

    async def volume_disk_of(self, live: LiveInstance) -> VolumeDiskPath | None:
        """Where the instance's volumes' disks lie; 409 naming a volume whose disk is gone."""
        if not live.record.volumes:
            return None
        catalog = self.attachments.require_catalog()
        for mount in live.record.volumes:
            path = catalog.disk_path(mount.volume_id)
            if not await asyncio.to_thread(path.exists):
                raise Conflict(
                    f"instance {live.name}: the disk of volume {mount.volume_id} (mounted at "
                    f"{mount.mount_path}) is gone; detach it to start the instance",
                    code="volume_unusable",
                )
        return catalog.disk_path

    async def image_of(self, live: LiveInstance) -> ReadyImage:
        """The content the instance was created from (pinned by digest), for a boot or restore."""
        try:
            return await self.images.get_ready_by_digest(live.record.image_digest)
        except ImageNotFound as exc:
            raise NotFound(f"the image of instance {live.name} is gone: {exc}") from exc

    # ---- boot and watch ---------------------------------------------------------------------

    async def boot(self, live: LiveInstance, image: ReadyImage, *, provision: bool = True) -> None:
        """Launch the VMM and start watching it. A create's first boot marks the instance
        provisioned (kept by the next server); a fork does that itself once it answers."""
        async with self.network.plugged(live, keep_identity=False):
            spec = guest_spec(
                live.record, image, live.paths.directory, self.network, await self.volume_disk_of(live)
            )
            launched = await launch_guest(self.hypervisor, self.system(), spec)
        before = live.record
        now = utcnow()
        # This boot's history, in memory first: the watcher and readers must not see the last
        # boot's markers as this one's. Then the VMM is watched and in the table before anything
        # else is awaited, so that a failure below still finds it and ends it.
        live.record = before.model_copy(update={
            "provisioned": before.provisioned or provision,
            "started_at": now,
            "stopped_at": None,
            "console_offset": launched.console_offset,
            "program_started_at": None,
            "agent_ready_at": None,
            "identity_pending": False,  # a fresh boot has its own kernel and randomness
            "exit": None,
            "crash": None,
            **phase_change(before, "initializing", now),
        })
        live.handle = launched.handle
        live.exit_seen_at = None
        live.scanner = ConsoleScanner(live.paths.console_log, launched.console_offset)
        live.forget_status()
        self.table.add(live)
        self.watch(live, launched.handle)
        try:
            await records.save(live)
        except BaseException:
            # Not recorded, so not started: the VMM goes, and the record stays what it was.
            await self.end_vmm(live)
            live.record = before
            raise
        self.oplog.write(live, f"boot: VMM pid {launched.handle.pid} started")

    def watch(self, live: LiveInstance, handle: VMHandle) -> None:
        live.watcher = asyncio.create_task(self._watch(live, handle), name=f"watch-{live.id}")

    async def _watch(self, live: LiveInstance, handle: VMHandle) -> None:
        """Keep the record's history while this VMM lives; record its end."""
        ticks = 0
        try:
            while handle.is_alive():
                ticks += 1
                if ticks % IO_ERROR_CHECK_TICKS == 0:
                    await self._resume_after_disk_full(live, handle)
                markers = await self.reader.markers(live)
                if live.record.program_started_at is None and markers.program_start_ts is not None:
                    await records.note(live, program_started_at=utcnow())
                    self.oplog.write(live, "program started")
                if live.record.agent_ready_at is None and markers.agent_ready_ts is not None:
                    await records.note(live, agent_ready_at=utcnow())
                if live.record.phase == "initializing" and booted(markers, live.record):
                    await records.note(live, **phase_change(live.record, "running", utcnow()))
                if markers.exit is not None:
                    break
                await handle.wait_exit(WATCH_INTERVAL)
            await handle.wait_exit()
            async with live.lock:
                if live.handle is handle and not live.deleted:
                    await self.record_exit(live, at=utcnow())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("instance %s: watcher failed", live.id)

    async def _resume_after_disk_full(self, live: LiveInstance, handle: VMHandle) -> None:
        """A guest paused because the data disk filled up continues once there is room again
        (QEMU retries the failed writes); if the disk fills again, QEMU pauses it again."""
        if await self.reader.vm_status(live) is not VMStatus.IO_ERROR:
            return
        if not await self.reader.disk_full(live):
            return
        free = await asyncio.to_thread(_free_bytes, live.paths.directory)
        if free < RESUME_MIN_FREE:
            return
        async with live.lock:
            if live.handle is not handle or live.deleted:
                return
            self.oplog.write(live, f"disk space is back ({free >> 20} MiB free): resuming the guest")
            try:
                await handle.resume()
            except DomainError as exc:
                log.warning("instance %s: could not resume after a full disk: %s", live.id, exc)
            live.forget_status()

    async def record_exit(
        self, live: LiveInstance, at: datetime | None, *, expected: bool = False, **changes: Any
    ) -> None:
        """The VMM is gone: close what pointed at it and note how the program ended, and how the
        VM did: a VMM killed by a signal or failing, or a guest kernel panic, is recorded as a
        crash unless the server ended it itself (``expected``). ``at`` None: it ended while no
        server watched; the time comes from its supervisor's record. ``changes`` land in the
        same record write. An unexpected end is told to the listeners (EXITED)."""
        handle = live.handle
        if handle is not None:
            vmm_exit = await handle.exit_info()
        else:
            vmm_exit = await asyncio.to_thread(read_vmm_exit, live.paths.directory)
        if live.exit_seen_at is not None:
            ended = live.exit_seen_at
        elif at is not None:
            ended = at
        elif vmm_exit is not None:
            ended = vmm_exit.at
        else:
            ended = await asyncio.to_thread(_last_sign_of_life, live)
        # Readers see this moment as stopped_at from now on, until the record holds it.
        live.exit_seen_at = ended
        await self.agents.close(live)
        if handle is not None:
            await handle.close()
            live.handle = None
        live.forget_status()
        await self.network.unplug(live, release=True)
        markers = await self.reader.markers(live)
        if live.record.phase == "initializing" and booted(markers, live.record):
            # It became Running before the watcher noted it (or while no server watched): the
            # time it ran counts as running, from when its console said so.
            await records.note(live, **phase_change(live.record, "running", _booted_at(live, markers, ended)))
        exit_info = (
            GuestExitInfo(code=markers.exit.code, message=markers.exit.message) if markers.exit else None
        )
        crash = None
        if not expected:
            console, offset = live.paths.console_log, live.record.console_offset
            crash = await asyncio.to_thread(crash_report, vmm_exit, console, offset)
        await records.note(
            live, stopped_at=ended, exit=exit_info, crash=crash,
            **phase_change(live.record, "stopped", ended), **changes,
        )
        live.exit_seen_at = None
        detail = f"exit code {exit_info.code} ({exit_info.message})" if exit_info else "no exit recorded"
        self.oplog.write(live, f"stopped: {detail}" + (f"; crashed: {crash}" if crash else ""))
        if crash:
            log.warning("instance %s (%s) crashed: %s", live.name, live.id, crash)
        if not expected:
            self.events.emit(InstanceEvent(
                EventKind.EXITED, live.id, manual=False,
                exit_code=exit_info.code if exit_info else None, crash=crash,
            ))

    async def adopt(self, live: LiveInstance) -> None:
        """At server start: watch a VMM that outlived the last server, or record the exit of one
        that ended while no server watched."""
        handle = await self.hypervisor.adopt(live.paths.directory)
        live.scanner = ConsoleScanner(live.paths.console_log, live.record.console_offset)
        if handle is not None:
            log.info("instance %s (%s): adopted VMM pid %d", live.name, live.id, handle.pid)
            live.handle = handle
            self.oplog.write(live, f"server restarted: adopted running VMM pid {handle.pid}")
            self.watch(live, handle)
        elif live.record.phase not in ("stopped", "standby"):
            await self.record_exit(live, at=None)

    # ---- operations ---------------------------------------------------------------------------

    async def stop(self, live: LiveInstance, **changes: Any) -> None:
        observed = await self.reader.state(live)
        if observed.state not in (InstanceState.RUNNING, InstanceState.INITIALIZING):
            raise InvalidState(
                f"instance {live.name} is {observed.state.value}; stop needs Running or Initializing"
            )
        handle = live.handle
        assert handle is not None
        self.oplog.write(live, "stop requested")
        await self.agents.close(live)
        outcome = await handle.shutdown(timeout=live.record.stop_timeout + POWEROFF_MARGIN)
        self.oplog.write(live, f"stop: {outcome.value}")
        await self.record_exit(live, at=utcnow(), expected=True, **changes)

    async def start(self, live: LiveInstance, request: StartInstanceRequest) -> None:
        observed = await self.reader.state(live)
        if observed.state is not InstanceState.STOPPED:
            raise InvalidState(f"instance {live.name} is {observed.state.value}; start needs Stopped")
        image = await self.image_of(live)
        async with self.admission.boot(live):
            changes: dict[str, Any] = {}
            if request.entrypoint is not None:
                changes["entrypoint"] = request.entrypoint
            if request.cmd is not None:
                changes["cmd"] = request.cmd
            if changes:
                await records.update(live, **changes)
            self.oplog.write(live, "start requested")
            await self.boot(live, image)

    async def boot_admitted(self, live: LiveInstance) -> None:
        """Boot an existing instance from its disk (a Stopped snapshot brought to Running)."""
        image = await self.image_of(live)
        async with self.admission.boot(live):
            await self.boot(live, image, provision=False)

    async def end_vmm(self, live: LiveInstance, *, graceful: bool = False) -> None:
        """End whatever VMM the instance has (graceful: the guest's power button first)."""
        handle, live.handle = live.handle, None
        await self.agents.close(live)
        if handle is None:
            return
        if handle.is_alive():
            if graceful:
                await handle.shutdown(timeout=live.record.stop_timeout + POWEROFF_MARGIN)
            else:
                await handle.kill()
        await handle.close()
        await self.network.unplug(live, release=True)

    async def delete(self, live: LiveInstance, *, graceful: bool) -> None:
        # The intent first, durably: a server killed from here on finishes the delete at its next
        # start instead of listing an instance whose disks are half gone.
        await asyncio.to_thread(_mark_deleting, live.paths.delete_intent)
        live.deleted = True
        # A record write already under way (the watcher's, in a thread) finishes before the
        # directory goes; every later one sees ``deleted`` and writes nothing.
        async with live.write_lock:
            pass
        await self.compression.cancel_for_instance(live.id)
        await self.end_vmm(live, graceful=graceful)
        if live.watcher is not None and live.watcher is not asyncio.current_task():
            live.watcher.cancel()
        # Lines already written to the operations log land before the directory goes.
        await self.oplog.flush()
        # Files first: an instance leaves the list only once nothing of it is left on disk.
        await asyncio.to_thread(shutil.rmtree, live.paths.directory, ignore_errors=True)
        self.table.pop(live.id)
        log.info("instance %s (%s) deleted", live.name, live.id)
        await self.images.release(live.record.image_digest)

    async def discard(self, instance_id: str, directory: Path) -> None:
        """Remove everything a failed create or fork made (its VMM included, if one was launched)."""
        live = self.table.pop(instance_id)
        if live is not None:
            live.deleted = True
            if live.watcher is not None:
                live.watcher.cancel()
            try:
                await self.end_vmm(live)
            except Exception as exc:  # the create or fork already failed; say what is left
                log.warning("instance %s: could not end the VMM of a failed create or fork: %s", live.id, exc)
        await self.oplog.flush()
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)


PANIC_LINE = "Kernel panic - not syncing:"
CONSOLE_TAIL = 16 << 10


def crash_report(vmm_exit: VMMExit | None, console: Path, boot_offset: int) -> str | None:
    """Blocking (reads the console's tail). Why a VM ended abnormally, or None: its VMM killed by
    a signal or exiting with an error, or this boot's guest kernel panicking (QEMU then exits
    cleanly, as the guest asked to power off)."""
    reasons = []
    if vmm_exit is not None and not vmm_exit.clean:
        why = f"the VMM {vmm_exit.describe()}"
        if vmm_exit.signal == "SIGBUS":
            why += " (its RAM file could not be backed: is the data disk full?)"
        reasons.append(why)
    panic = _kernel_panic(console, boot_offset)
    if panic is not None:
        reasons.append(f"guest kernel panic: {panic}")
    return "; ".join(reasons) or None


def _kernel_panic(console: Path, boot_offset: int) -> str | None:
    try:
        with console.open("rb") as log_file:
            size = log_file.seek(0, os.SEEK_END)
            log_file.seek(max(boot_offset, size - CONSOLE_TAIL))
            tail = log_file.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    found = [line for line in tail.splitlines() if PANIC_LINE in line]
    if not found:
        return None
    return found[-1].split(PANIC_LINE, 1)[1].strip() or "no reason given"


def _booted_at(live: LiveInstance, markers: ConsoleMarkers, ended: datetime) -> datetime:
    """When the guest's markers said it was up: they count seconds since the guest booted, which
    began just after the VMM started; kept within the phase it ends and the end itself."""
    record = live.record
    seconds = max(ts for ts in (markers.program_start_ts, markers.agent_ready_ts) if ts is not None)
    moment = (record.started_at or record.phase_since) + timedelta(seconds=seconds)
    return min(max(moment, record.phase_since), ended)


def _last_sign_of_life(live: LiveInstance) -> datetime:
    """When a VM that ended unwatched, with no record of its end, was last seen alive: its last
    console or VMM output, never before the phase it was in began."""
    seen = [_mtime(live.paths.console_log), _mtime(live.paths.vmm_log), live.record.phase_since]
    return max(moment for moment in seen if moment is not None)


def _mark_deleting(intent: Path) -> None:
    """Blocking. An empty file needs no data block: even a full disk takes it (and if not, the
    delete, which is what frees space, goes on without the mark)."""
    try:
        intent.touch()
        fsync_dir(intent.parent)
    except OSError as exc:
        if not is_no_space(exc):
            raise
        log.warning("could not mark %s as being deleted (%s); deleting anyway", intent.parent.name, exc)


def _free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return None
