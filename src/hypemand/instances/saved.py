"""Operations on an instance's saved VM: standby and restore, capture for a snapshot, restore
from a snapshot in place, fork into a new instance, and the fork's new identity.

**Standby** pauses the VM and migrates its device state (guest RAM is a shared file mapping, so
it is not copied), writes the standby record last and only then ends QEMU; a failure before
that resumes the VM. **Restore** checks what it loads, relaunches with the saved state, removes
the standby record, and sets the guest's clock through the agent. The files themselves are
:mod:`hypemand.savedvm`'s; the caller of each method holds the instance's lock unless it says
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hypemand.errors import DomainError, InvalidState
from hypemand.hypervisor.base import Board, ForkIdentity, Hypervisor, VMStatus
from hypemand.hypervisor.qemu_cmdline import guest_mac
from hypemand.instances import records
from hypemand.instances.admission import Admission
from hypemand.instances.agents import AgentLinks
from hypemand.instances.console import ConsoleScanner
from hypemand.instances.lifecycle import Lifecycle
from hypemand.instances.live import InstanceTable, LiveInstance, mutating
from hypemand.instances.models import InstanceRecord, InstanceState, StandbyInstanceRequest
from hypemand.instances.networking import Networking
from hypemand.instances.records import OperationsLog, phase_change, utcnow
from hypemand.instances.state import StateReader
from hypemand.layout import InstancePaths
from hypemand.savedvm.digest import file_digest
from hypemand.savedvm.errors import SavedVMCorrupt
from hypemand.savedvm.files import SavedVMFiles
from hypemand.savedvm.jobs import CompressionJobs, ensure_raw_memory
from hypemand.savedvm.models import StandbyRecord

log = logging.getLogger(__name__)

SnapshotKind = Literal["Standby", "Stopped"]


@dataclass(frozen=True)
class SavedVM:
    """A saved VM to bring into an instance: a stored snapshot's payload, or a fork's staging
    copy. The snapshot domain owns where it lies; this is what the instance domain needs."""

    snapshot_id: str
    kind: SnapshotKind
    files: SavedVMFiles
    record: InstanceRecord
    state_digest: str | None
    qemu_version: str


def own_files(live: LiveInstance) -> SavedVMFiles:
    """The saved VM in the instance's own directory (its standby)."""
    return SavedVMFiles(live.paths.saved)


class SavedVMOperations:
    def __init__(
        self,
        *,
        table: InstanceTable,
        hypervisor: Hypervisor,
        lifecycle: Lifecycle,
        admission: Admission,
        reader: StateReader,
        agents: AgentLinks,
        oplog: OperationsLog,
        compression: CompressionJobs,
        network: Networking,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        self.table = table
        self.network = network
        self.hypervisor = hypervisor
        self.lifecycle = lifecycle
        self.admission = admission
        self.reader = reader
        self.agents = agents
        self.oplog = oplog
        self.compression = compression
        self.spawn = spawn

    # ---- standby and restore ----------------------------------------------------------------

    async def standby(
        self, live: LiveInstance, request: StandbyInstanceRequest,
        precheck: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Pause the VM, save its device state, end QEMU; the RAM file stays where it is.
        ``precheck`` (auto-standby's last look for a connection) runs while the VM is paused and
        saved, before the standby is committed; if it raises, the VM runs on as if nothing
        happened and the error is the caller's."""
        policy = live.record.snapshot_policy
        plan = self.compression.plan(
            request.compression,
            request.compression_delay,
            policy.compression if policy else None,
            policy.standby_compression_delay if policy else None,
        )
        observed = await self.reader.state(live)
        if observed.state is not InstanceState.RUNNING:
            raise InvalidState(f"cannot standby instance {live.name} from state {observed.state.value}")
        handle = live.handle
        assert handle is not None
        files = own_files(live)
        self.oplog.write(live, "standby requested")
        # The agent stays linked until QEMU is gone: the guest is saved believing its host is
        # there, so after a restore (which links before the guest runs) it reads the new HELLO at
        # once instead of noticing the host on its next reconnect poll. Closed earlier, QEMU would
        # also tell a paused, already saved guest that the host left.
        await self.hypervisor.save_state(handle, files.device_state)
        try:
            if precheck is not None:
                await precheck()
            standby = StandbyRecord(
                created_at=utcnow(),
                state_digest=await asyncio.to_thread(file_digest, files.device_state),
                memory_size=(await asyncio.to_thread(files.memory.stat)).st_size,
                qemu_version=await asyncio.to_thread(self.hypervisor.version),
                # Kept with the saved VM, so a server restart resumes an unfinished job.
                compression=plan,
            )
            await asyncio.to_thread(files.write_standby, standby)
        except BaseException:
            # Nothing is lost yet: QEMU still holds the VM. Let it run on.
            await asyncio.to_thread(files.forget_standby)
            with contextlib.suppress(DomainError):
                await handle.resume()
            raise
        # From here the saved VM is complete on disk; ending QEMU cannot lose it. The record says
        # so before the handle goes: from the moment a read derives Standby (no VMM, a saved VM),
        # the instance holds its address as one in standby (never free for another VM, and
        # found asleep by the ingress, which wakes it), with no moment in between.
        now = utcnow()
        await records.update(live, stopped_at=now, **phase_change(live.record, "standby", now))
        live.handle = None
        live.forget_status()
        try:
            await self.hypervisor.end_saved(handle)
        finally:
            await self.agents.close(live)
        # The TAP goes, the identity stays (the record keeps the pair, held while in standby).
        await self.network.unplug(live, release=False)
        self.oplog.write(live, "standby: device state saved, VMM ended")
        if plan is not None:
            self.compression.start_for_instance(live.id, files.memory, plan)

    async def restore(self, live: LiveInstance) -> None:
        """Bring a Standby instance back; on failure it stays Standby and can be retried."""
        files = own_files(live)
        await self.compression.cancel_for_instance(live.id)
        await asyncio.to_thread(ensure_raw_memory, files.memory)
        standby = await asyncio.to_thread(files.load_standby)
        await asyncio.to_thread(files.verify_standby, standby)
        await self.lifecycle.image_of(live)
        self.oplog.write(live, "restore requested")
        linking = None
        try:
            async with self.admission.boot(live):
                # The agent is dialled while QEMU starts and loads the state: the guest finds
                # the HELLO waiting when it runs again (see AgentLinks.dial_restoring).
                linking = self.agents.dial_restoring(live, files.directory)
                # The same TAP name, IP and MAC as before the standby: the guest never knew.
                async with self.network.plugged(live, keep_identity=True):
                    # A fork's guest still has its source's MAC and address until the agent gives
                    # it its own: unplugged until then, it cannot teach the bridge that the source
                    # lives behind the fork's port (restored guests announce themselves at once).
                    handle = await self.hypervisor.restore(
                        files.directory, files.device_state, nic_down=self._unplugged_until_identity(live)
                    )
            # Running again: the saved VM is used up. Remove the record first, so that a crash in
            # between leaves a running VM and a stale state file, never a second claim to Standby.
            live.handle = handle
            live.exit_seen_at = None
            live.clock_stale = True
            live.forget_status()
            # Watched before anything else is awaited: a failure below leaves a VM whose end is
            # still recorded.
            self.lifecycle.watch(live, handle)
            await asyncio.to_thread(files.forget_standby)
            now = utcnow()
            await records.update(
                live, stopped_at=None, exit=None, crash=None, **phase_change(live.record, "running", now)
            )
            self.oplog.write(live, f"restore: VMM pid {handle.pid} running")
        except BaseException:
            await self.agents.abandon(linking)
            raise
        # Running means usable: the agent has answered and the guest's clock is set before the
        # answer. The handshake went on during the steps above, so little of it is waited for.
        if await self.agents.adopt_restored(live, linking):
            self.oplog.write(live, "restore: guest agent answered, guest clock set")
        if live.record.identity_pending:
            await self.new_identity(live)
        else:
            await self._announce(live)

    # ---- snapshots: capture, restore in place, fork ---------------------------------------------

    async def capture(self, live: LiveInstance, kind: SnapshotKind, target: SavedVMFiles) -> InstanceRecord:
        """Copy what a snapshot of ``kind`` holds into ``target``. A Running source is paused
        only while its device state is saved and its RAM and overlay are copied, then always
        continues."""
        state = (await self.reader.state(live)).state
        files = own_files(live)
        await asyncio.to_thread(target.directory.mkdir, parents=True, exist_ok=True)
        if kind == "Standby":
            if state is InstanceState.RUNNING:
                handle = live.handle
                assert handle is not None
                await self.hypervisor.save_state(handle, target.device_state)
                try:
                    # Not fsynced while the guest is paused: durability comes after it runs.
                    await asyncio.to_thread(
                        files.copy_to, target, with_memory=True, with_state=False, durable=False
                    )
                finally:
                    # Always back to Running, whether the copy worked or not.
                    await handle.resume()
                    live.forget_status()
                await asyncio.to_thread(target.make_durable)
                self.oplog.write(live, "snapshot (Standby) taken while running")
            elif state is InstanceState.STANDBY:
                await self.compression.cancel_for_instance(live.id)
                await asyncio.to_thread(ensure_raw_memory, files.memory)
                await asyncio.to_thread(files.copy_to, target, with_memory=True, with_state=True)
                self.oplog.write(live, "snapshot (Standby) taken from standby")
            else:
                raise InvalidState(
                    f"a Standby snapshot needs its source Running or Standby; {live.name} is {state.value}"
                )
        else:
            if state is not InstanceState.STOPPED:
                raise InvalidState(
                    f"a Stopped snapshot needs its source Stopped; {live.name} is {state.value}"
                )
            await asyncio.to_thread(files.copy_to, target, with_memory=False, with_state=False)
            self.oplog.write(live, "snapshot (Stopped) taken")
        return live.record.model_copy(deep=True)

    async def restore_snapshot(
        self, live: LiveInstance, source: SavedVM, target: InstanceState, board: Board | None
    ) -> None:
        """Replace an instance's disks (and saved VM) with a snapshot's, then bring it to
        ``target``. The instance must not be running."""
        state = (await self.reader.state(live)).state
        if state in (InstanceState.RUNNING, InstanceState.INITIALIZING):
            raise InvalidState(
                f"instance {live.name} is {state.value}; stop it or put it in standby before "
                "restoring a snapshot into it"
            )
        await self.lifecycle.end_vmm(live)
        await self.compression.cancel_for_instance(live.id)
        paths = live.paths
        with_memory = source.kind == "Standby"
        await asyncio.to_thread(own_files(live).replace_with, source.files, with_memory=with_memory)
        console = await asyncio.to_thread(_size_of, paths.console_log)
        now = utcnow()
        current = live.record
        live.record = source.record.model_copy(
            update={
                "id": current.id,
                "name": current.name,
                "created_at": current.created_at,
                "expires_at": current.expires_at,
                "board": board or source.record.board,
                "provisioned": True,
                "started_at": None,
                "stopped_at": now,
                "exit": None,
                "crash": None,
                "console_offset": console,
                "phase": current.phase,
                "phase_since": current.phase_since,
                "phase_ms": current.phase_ms,
                # Policies are the instance's, not the snapshot's.
                "health_check": current.health_check,
                "restart_policy": current.restart_policy,
                "restart_status": current.restart_status,
                "auto_standby": current.auto_standby,
                "auto_standby_memory": current.auto_standby_memory,
            }
        )
        live.scanner = ConsoleScanner(paths.console_log, console)
        saved_phase = "standby" if source.kind == "Standby" else "stopped"
        await records.update(live, **phase_change(live.record, saved_phase, now))
        self.oplog.write(live, f"restored from snapshot {source.snapshot_id} ({source.kind})")
        await self.bring_to(live, source, target)

    async def fork_into(
        self, paths: InstancePaths, name: str, source: SavedVM, target: InstanceState, board: Board | None
    ) -> LiveInstance:
        """A new instance from a saved VM: its own id, name, MAC, overlay copy and agent
        channel; a Standby fork maps the source's RAM file copy-on-write and gets fresh
        randomness before it is reported Running. The caller holds the name and discards the
        directory on failure."""
        instance_id = paths.directory.name
        files = SavedVMFiles(paths.saved)
        await asyncio.to_thread(files.fork_from, source.files, with_memory=source.kind == "Standby")
        await asyncio.to_thread(paths.console_log.parent.mkdir, parents=True, exist_ok=True)
        # Its own address, held from here until it runs (a restore keeps what it is given).
        nic: dict[str, Any] = {"mac": guest_mac(instance_id), "ip": None}
        if source.record.ip is not None and self.network.model == "bridge":
            chosen = self.network.reserve(instance_id)
            nic = {"mac": chosen.mac, "ip": str(chosen.ip)}
        try:
            return await self._fork_into(paths, name, source, target, board, nic)
        finally:
            self.network.settle(instance_id)

    async def _fork_into(
        self, paths: InstancePaths, name: str, source: SavedVM, target: InstanceState, board: Board | None,
        nic: dict[str, Any],
    ) -> LiveInstance:
        instance_id = paths.directory.name
        if source.kind == "Standby":
            identity = ForkIdentity(vm_id=instance_id, mac=nic["mac"])
            await asyncio.to_thread(self.hypervisor.prepare_fork, paths.directory, identity)
        now = utcnow()
        record = source.record.model_copy(
            update={
                "id": instance_id,
                "name": name,
                "created_at": now,
                "expires_at": None,
                "board": board or source.record.board,
                **nic,
                # Not until the fork answers: a server killed before that removes it at start,
                # rather than keeping an instance whose id the client never got.
                "provisioned": False,
                "started_at": None,
                "stopped_at": now,
                "exit": None,
                "crash": None,
                "console_offset": 0,
                "program_started_at": None,
                "agent_ready_at": None,
                "identity_pending": source.kind == "Standby",
                "phase": "standby" if source.kind == "Standby" else "stopped",
                "phase_since": now,
                "phase_ms": {},
                # The source's policies come along; its supervisors' bookkeeping does not.
                "restart_status": None,
                "auto_standby_memory": None,
            }
        )
        live = LiveInstance(record=record, paths=paths)
        live.scanner = ConsoleScanner(paths.console_log, 0)
        await records.save(live)
        self.table.add(live)
        self.oplog.write(live, f"forked from snapshot {source.snapshot_id} of {source.record.name}")
        async with mutating(live):
            await self.bring_to(live, source, target)
            await records.update(live, provisioned=True)
        return live

    async def bring_to(self, live: LiveInstance, source: SavedVM, target: InstanceState) -> None:
        """From a freshly copied saved VM (Standby kind) or disk (Stopped kind) to ``target``."""
        files = own_files(live)
        if source.kind == "Standby":
            standby = StandbyRecord(
                created_at=utcnow(),
                state_digest=source.state_digest or "",
                memory_size=(await asyncio.to_thread(files.memory.stat)).st_size,
                qemu_version=source.qemu_version,
            )
            await asyncio.to_thread(files.write_standby, standby)
            if target is InstanceState.RUNNING:
                await self.restore(live)
            elif target is InstanceState.STOPPED:
                await asyncio.to_thread(files.forget_standby)
                await asyncio.to_thread(files.memory.unlink, missing_ok=True)
                await records.update(live, **phase_change(live.record, "stopped", utcnow()))
        elif target is InstanceState.RUNNING:
            await self.lifecycle.boot_admitted(live)

    # ---- identity and start-up ----------------------------------------------------------------

    @staticmethod
    def _unplugged_until_identity(live: LiveInstance) -> bool:
        return live.record.identity_pending and live.record.ip is not None

    async def new_identity(self, live: LiveInstance) -> None:
        """A fork resumed the source's memory: give it its own identity, then (only then) plug its
        NIC in and call it Running."""
        await self.agents.give_identity(live, self.network.guest_network(live.record))
        if self._unplugged_until_identity(live) and live.handle is not None:
            await live.handle.set_nic_link(True)
        await self._announce(live)
        now = utcnow()
        await records.update(live, program_started_at=now, agent_ready_at=now, identity_pending=False)
        self.oplog.write(live, "fork identity set: RNG reseeded from host entropy, MAC and hostname changed")

    @staticmethod
    async def _announce(live: LiveInstance) -> None:
        """The restored VM tells the network where it is now (the TAP is new), once its agent
        answered rather than while it should (see ``Hypervisor.restore``). Best effort: the
        bridge learns the VM's port from its next frame anyway."""
        if live.handle is None:
            return
        try:
            await live.handle.announce()
        except DomainError as exc:
            log.warning("instance %s: could not announce the restored VM: %s", live.id, exc)

    async def _complete_identity(self, live: LiveInstance) -> None:
        try:
            async with mutating(live):
                if live.handle is not None and live.record.identity_pending:
                    await self.new_identity(live)
        except (DomainError, TimeoutError) as exc:
            # A fork without its own identity must not run on as a copy of another VM: it ends,
            # and says why.
            log.warning("instance %s: could not complete the fork's identity (%s): ending it", live.id, exc)
            async with live.lock:
                if live.deleted or live.handle is None:
                    return
                await self.lifecycle.end_vmm(live)
                now = utcnow()
                await records.note(
                    live,
                    stopped_at=now,
                    crash=f"its identity as a fork could not be set: {exc}",
                    **phase_change(live.record, "stopped", now),
                )

    async def finish_interrupted(self, live: LiveInstance) -> None:
        """At server start: a VMM left paused by a standby, restore or snapshot that the last
        server did not finish. Finish or undo it, so the instance is in one true state."""
        handle = live.handle
        assert handle is not None
        status = await handle.status(timeout=5.0)
        files = own_files(live)
        saved = await asyncio.to_thread(files.has_standby)
        if status in (VMStatus.POSTMIGRATE, VMStatus.FINISH_MIGRATE) and saved:
            log.warning("instance %s: finishing an interrupted standby", live.id)
            live.handle = None
            await self.hypervisor.end_saved(handle)
            await self.network.unplug(live, release=False)
            now = utcnow()
            await records.update(live, stopped_at=now, **phase_change(live.record, "standby", now))
        elif status in (VMStatus.INMIGRATE, VMStatus.PRELAUNCH) and saved:
            log.warning("instance %s: undoing an interrupted restore", live.id)
            live.handle = None
            await handle.kill(keep_memory=True)
            await handle.close()
            await self.network.unplug(live, release=False)
        elif status in (VMStatus.POSTMIGRATE, VMStatus.FINISH_MIGRATE, VMStatus.PAUSED):
            log.warning("instance %s: resuming a VM an interrupted operation left paused", live.id)
            with contextlib.suppress(DomainError):
                await handle.resume()
            await asyncio.to_thread(files.forget_standby)
        elif status is VMStatus.RUNNING and saved:
            # A restore that got as far as running: the saved files are used up.
            await asyncio.to_thread(files.forget_standby)
        if live.handle is not None and live.record.identity_pending:
            # A fork whose new identity was not given yet: give it now, before it is Running.
            log.warning("instance %s: completing an interrupted fork", live.id)
            live.clock_stale = True
            self.spawn(self._complete_identity(live), f"identity-{live.id}")

    async def resume_standby_compression(self, live: LiveInstance) -> None:
        """A standby whose memory compression the last server did not finish: start it again
        (the raw file goes only once the compressed copy is durable, so it is still there)."""
        files = own_files(live)
        if live.handle is not None or not await asyncio.to_thread(files.has_standby):
            return
        try:
            standby = await asyncio.to_thread(files.load_standby)
        except SavedVMCorrupt:
            return
        if standby.compression is not None and await asyncio.to_thread(files.memory.exists):
            plan = standby.compression.model_copy(update={"delay_seconds": 0.0})
            self.compression.start_for_instance(live.id, files.memory, plan)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
