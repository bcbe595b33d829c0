"""The QEMU backend: boards ``qemu-microvm`` (microvm) and ``qemu`` (q35).

Lifecycle of a VMM process:
- ``start`` writes ``qemu-config.json`` (the launch contract: config, argv, QEMU version), starts
  QEMU under its supervisor (``shim``: a new session, cwd = VM directory), records QEMU's and
  the supervisor's identity in ``vmm.json`` at once, and waits until QMP answers. QEMU is never
  our child: it survives the server, its exit is observed through a pidfd (which works for
  adopted processes too), and its supervisor records how it ended in ``vmm-exit.json``.
- ``adopt`` re-attaches after a server restart: ``vmm.json`` must name a live process with the
  recorded start time, boot id and working directory, and its command line must be exactly the
  recorded argv. Anything else is refused (a reused PID is never signalled).
- Starting a VM whose directory already has a live VMM raises ``Conflict``: the caller decides
  (``adopt`` it, or shut it down first). A start silently returning the old VM could hand back a
  VM with a different configuration than the one asked for.
- ``reap_orphans`` ends the QEMUs that no ``vmm.json`` names: a server that died between spawning
  QEMU and recording it leaves one that nothing adopts and that holds its overlay disk's lock.
- A VM with a TAP NIC (``VMConfig.tap_network``) gets its TAP as an open descriptor at every
  launch: the TAP lives in the network's namespace, QEMU in the host's, so QEMU cannot open it by
  name. ``tap_opener`` (the network's ``open_tap``) opens it; the descriptor's number goes into
  the recorded argv, QEMU inherits it, and the server's copy is closed once QEMU has it.

:class:`QemuHypervisor` launches and adopts; its collaborators do the rest: the launch record
(``qemu_launch``), the handle of a running VM (``qemu_vm``), saving and loading device state
(``qemu_migration``) and orphan reaping (``qemu_orphans``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from hypemand.errors import Conflict, DomainError, InvalidState
from hypemand.fsutil import exclusive_lock
from hypemand.hypervisor import qemu_migration, qemu_spawn
from hypemand.hypervisor.base import (
    Accel,
    Capabilities,
    ForkIdentity,
    Hypervisor,
    HypervisorStatePaths,
    VMConfig,
    VMHandle,
    VMMError,
    VMPaths,
)
from hypemand.hypervisor.process import ProcessRecord, ProcessWatch, process_cmdline
from hypemand.hypervisor.qemu_cmdline import build_qemu_argv, machine_type
from hypemand.hypervisor.qemu_host import (
    AccelDecision,
    find_qemu_binary,
    host_tsc_khz,
    probe_acceleration,
    qemu_version,
)
from hypemand.hypervisor.qemu_launch import QemuLaunchRecord, prepare_fresh_boot, prepare_restore
from hypemand.hypervisor.qemu_migration import prepare_migration
from hypemand.hypervisor.qemu_orphans import OrphanReaper, OrphanVMM
from hypemand.hypervisor.qemu_vm import QemuVMHandle, vmm_log_tail
from hypemand.hypervisor.shim import ensure_vmm_shim

__all__ = ["OrphanVMM", "QemuHypervisor", "QemuLaunchRecord", "QemuVMHandle"]

log = logging.getLogger(__name__)

QMP_READY_TIMEOUT = 15.0  # process start -> QMP answering; ~40 ms when idle, more under load
QMP_POLL_INTERVAL = 0.005  # QMP is usually up ~40 ms after spawn: poll finely, it costs a connect()

# Given a VM id, a fresh descriptor on that VM's TAP, owned by the caller (the backend).
TapOpener = Callable[[str], Awaitable[int]]


class QemuHypervisor(Hypervisor):
    name: ClassVar[str] = "qemu"

    def __init__(
        self,
        state_dir: Path | None = None,
        binary: Path | None = None,
        forced_accel: Accel | None = None,
        tap_opener: TapOpener | None = None,
    ) -> None:
        """``state_dir`` holds host-wide caches (see ``HypervisorStatePaths``); None: no caching.
        ``binary`` and ``forced_accel`` come from the settings (HYPEMAND_QEMU, HYPEMAND_ACCEL).
        ``tap_opener`` (``NetworkHost.open_tap``) opens the TAP of a VM with ``tap_network``; it is
        also a public attribute, for a network that starts after the backend is made."""
        self.tap_opener = tap_opener
        self._state = HypervisorStatePaths(state_dir) if state_dir is not None else None
        self._configured_binary = binary
        self._binary = binary
        self._forced_accel = forced_accel
        self._accel: AccelDecision | None = None
        self._accel_lock = asyncio.Lock()
        self._orphans = OrphanReaper(lambda: self.binary)
        self._shim: Path | None = None
        self._shim_lock = asyncio.Lock()

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_qemu_binary(self._configured_binary)
        return self._binary

    def version(self) -> str:
        """The version of the binary as it is now (re-read when the file changed). Blocking on a
        change: async code calls it through ``asyncio.to_thread``."""
        return qemu_version(self.binary)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            pause=True, graceful_shutdown=True, user_networking=True, tap_networking=True,
            disk_io_limit=False, snapshot=True, standby=True, live_snapshot=True, fork=True,
            balloon=True,
        )

    async def vmm_shim(self) -> Path:
        """The supervisor every QEMU runs under, built on first use (see ``hypervisor.shim``)."""
        async with self._shim_lock:
            if self._shim is None or not await asyncio.to_thread(self._shim.exists):
                state = self._state or HypervisorStatePaths.per_user_default()
                self._shim = await asyncio.to_thread(ensure_vmm_shim, state)
            return self._shim

    async def acceleration(self) -> AccelDecision:
        async with self._accel_lock:
            # A decision is about one QEMU version: an upgraded binary is decided afresh.
            version = await asyncio.to_thread(self.version)
            if self._accel is None or self._accel.qemu_version != version:
                cache = self._state.accel_decision if self._state is not None else None
                self._accel = await probe_acceleration(self.binary, cache, forced=self._forced_accel)
            return self._accel

    async def start(self, config: VMConfig) -> QemuVMHandle:
        directory = config.directory
        directory.mkdir(parents=True, exist_ok=True)
        config.paths.console_log.parent.mkdir(parents=True, exist_ok=True)
        busy = f"another start of the VM in {directory} is in progress"
        with exclusive_lock(config.paths.start_lock, busy):
            existing = await self._adopt_unlocked(directory, connect=False)
            if existing is not None:
                await existing.close()
                raise Conflict(
                    f"VM {config.vm_id}: QEMU is already running in {directory} (pid {existing.pid})"
                )
            await qemu_spawn.await_previous_supervisor(directory)

            accel = config.accel or (await self.acceleration()).accel
            # Off the event loop: the first TSC measurement sleeps 50 ms, and a changed QEMU
            # binary is asked for its version.
            tsc_khz = await asyncio.to_thread(host_tsc_khz) if accel is Accel.TCG else None
            version = await asyncio.to_thread(self.version)
            resolved = config.model_copy(update={"accel": accel})
            tap_fd = await self._open_tap(config)
            try:
                argv = build_qemu_argv(
                    resolved, binary=self.binary, accel=accel, tsc_khz=tsc_khz, tap_fd=tap_fd
                )
                launch = QemuLaunchRecord(
                    qemu_version=version,
                    qemu_binary=str(self.binary),
                    machine=machine_type(config.board),
                    accel=accel,
                    tsc_khz=tsc_khz,
                    config=resolved,
                    argv=argv,
                    launched_at=datetime.now(UTC),
                )
                await asyncio.to_thread(prepare_fresh_boot, launch)
            except BaseException:
                _close(tap_fd)
                raise
            return await self._launch(launch, tap_fd)

    async def _open_tap(self, config: VMConfig) -> int | None:
        """A descriptor on the VM's TAP (None for a VM without one), for the caller to hand to
        ``_launch`` or close."""
        if not config.tap_network:
            return None
        if self.tap_opener is None:
            raise VMMError(f"VM {config.vm_id} has a TAP NIC, but the server has no VM network to open it in")
        # Shielded, so that a cancelled launch still gets the descriptor, and closes it.
        opening = asyncio.ensure_future(self.tap_opener(config.vm_id))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        except DomainError:
            raise
        except Exception as exc:  # the network's TapError, a namespace gone, ...
            raise VMMError(f"VM {config.vm_id}: cannot open its TAP: {exc}") from exc

    async def _launch(self, launch: QemuLaunchRecord, tap_fd: int | None) -> QemuVMHandle:
        """Start the recorded ``launch`` and wait for QMP. Owns ``tap_fd`` (the number the argv
        names): QEMU inherits it and the server's copy is closed whatever happens."""
        config = launch.config
        directory = config.directory
        started = time.monotonic()
        vmm_log = config.paths.vmm_log
        vmm_fds = () if tap_fd is None else (tap_fd,)
        try:
            shim = await self.vmm_shim()
        except BaseException:
            _close(tap_fd)
            raise
        spawn = qemu_spawn.spawn_supervised
        # From here the thread owns the descriptors (it closes them once the shim has them).
        spawning = asyncio.ensure_future(
            asyncio.to_thread(spawn, shim, launch.argv, directory, vmm_log, vmm_fds)
        )
        try:
            # Shielded: a cancellation cannot stop the thread, and the QEMU it starts must not be
            # left running unrecorded (it would hold the overlay disk's write lock).
            spawned = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                # Shielded too: the spawn must run, or the descriptors it owns would stay open.
                await qemu_spawn.abandon(await asyncio.shield(spawning))
            raise
        try:
            record = await self._record(launch, spawned)
        except BaseException:
            await qemu_spawn.abandon(spawned)
            raise
        assert spawned.vmm is not None
        supervisor = ProcessWatch.open_supervisor(record, child=spawned.supervisor)
        handle = QemuVMHandle(launch, record, spawned.vmm, supervisor)
        try:
            await self._wait_for_qmp(handle)
        except BaseException:
            if handle.is_alive():
                await handle.kill()
            await handle.close()
            raise
        log.info(
            "VM %s: QEMU pid %d up (QMP answering) in %.3f s",
            config.vm_id,
            record.pid,
            time.monotonic() - started,
        )
        return handle

    async def _record(self, launch: QemuLaunchRecord, spawned: qemu_spawn.SpawnedVMM) -> ProcessRecord:
        """Write ``vmm.json`` for a QEMU just spawned; VMMError if it is gone already."""
        config = launch.config
        if spawned.vmm is None:
            # Its output (an exec failure, a bad option) is complete once the shim is gone.
            await asyncio.to_thread(spawned.supervisor.wait)
            raise VMMError(f"VM {config.vm_id}: QEMU did not start: {vmm_log_tail(config.paths.vmm_log)}")
        try:
            record = ProcessRecord.for_child(
                spawned.vmm.pid, config.directory, config.vm_id, launch.qemu_binary, spawned.supervisor.pid
            )
        except ProcessLookupError:
            record = None
        # Alive after the start time was read: that start time is this QEMU's (no PID reuse).
        if record is None or not spawned.vmm.is_alive():
            ended = await qemu_spawn.exit_description(spawned, config.directory)
            raise VMMError(
                f"VM {config.vm_id}: QEMU exited at once ({ended}): {vmm_log_tail(config.paths.vmm_log)}"
            )
        await asyncio.to_thread(record.save, config.paths.process_record)  # fsynced
        return record

    async def _wait_for_qmp(self, handle: QemuVMHandle) -> None:
        deadline = time.monotonic() + QMP_READY_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not handle.is_alive():
                ended = await handle.exit_info()
                how = ended.describe() if ended else "no exit record"
                raise VMMError(
                    f"VM {handle.vm_id}: QEMU (pid {handle.pid}) exited during startup "
                    f"({how}): {vmm_log_tail(handle.vmm_log_path)}"
                )
            try:
                await handle.qmp("query-status", timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                # Done now, at no one's expense, rather than on the standby's pause path.
                await prepare_migration(handle)
                return
            except (VMMError, InvalidState) as exc:
                last_error = exc
            await asyncio.sleep(QMP_POLL_INTERVAL)
        raise VMMError(f"VM {handle.vm_id}: QMP did not answer within {QMP_READY_TIMEOUT} s: {last_error}")

    async def adopt(self, directory: Path) -> QemuVMHandle | None:
        return await self._adopt_unlocked(directory, connect=True)

    async def _adopt_unlocked(self, directory: Path, *, connect: bool) -> QemuVMHandle | None:
        record = ProcessRecord.load(VMPaths(directory).process_record)
        launch = QemuLaunchRecord.load(directory)
        if record is None or launch is None:
            return None
        watch = ProcessWatch.open(record)
        if watch is None:
            return None
        if process_cmdline(record.pid) != launch.argv:
            log.warning(
                "VM %s: pid %d does not run the recorded command line; not adopting", record.vm_id, record.pid
            )
            watch.close()
            return None
        handle = QemuVMHandle(launch, record, watch, ProcessWatch.open_supervisor(record))
        if connect:
            # Best effort: the VM is ours either way; status() reports UNKNOWN while QMP is busy.
            try:
                await handle.qmp("query-status", timeout=2.0)
            except (VMMError, InvalidState) as exc:
                log.warning("VM %s: adopted pid %d but QMP did not answer: %s", record.vm_id, record.pid, exc)
        return handle

    # ---- standby, snapshots, fork (see qemu_migration) -------------------------------------------

    async def save_state(self, handle: VMHandle, state_file: Path) -> None:
        assert isinstance(handle, QemuVMHandle)
        await qemu_migration.save_state(handle, state_file)

    async def end_saved(self, handle: VMHandle) -> None:
        assert isinstance(handle, QemuVMHandle)
        await qemu_migration.end_saved(handle)

    def check_restorable(self, directory: Path) -> None:
        qemu_migration.check_restorable(directory, self.version())

    def writes_memory_file(self, directory: Path) -> bool:
        launch = QemuLaunchRecord.load(directory)
        return launch is None or launch.maps_memory_shared

    def prepare_fork(self, directory: Path, fork: ForkIdentity) -> None:
        launch = QemuLaunchRecord.load(directory)
        if launch is None:
            raise Conflict(f"{directory.name}: no launch record to fork from")
        launch.for_fork(directory, fork.vm_id, fork.mac).save()

    async def restore(self, directory: Path, state_file: Path, *, nic_down: bool = False) -> QemuVMHandle:
        busy = f"another start of the VM in {directory} is in progress"
        with exclusive_lock(VMPaths(directory).start_lock, busy):
            existing = await self._adopt_unlocked(directory, connect=False)
            if existing is not None:
                await existing.close()
                raise Conflict(f"VM in {directory}: QEMU is already running (pid {existing.pid})")
            await qemu_spawn.await_previous_supervisor(directory)
            await asyncio.to_thread(self.check_restorable, directory)
            launch = QemuLaunchRecord.load(directory)
            assert launch is not None
            restored = launch.for_restore(directory)
            tap_fd = await self._open_tap(restored.config)
            try:
                if tap_fd is not None:
                    restored = restored.with_tap_fd(tap_fd)
                await asyncio.to_thread(prepare_restore, restored)
            except BaseException:
                _close(tap_fd)
                raise
            handle = await self._launch(restored, tap_fd)
        await qemu_migration.load_state(handle, state_file, nic_down=nic_down)
        return handle

    # ---- orphans: QEMUs spawned by a server that died before writing vmm.json (see qemu_orphans)

    def find_orphans(self, guests_root: Path) -> list[OrphanVMM]:
        """Blocking; see ``OrphanReaper.find``."""
        return self._orphans.find(guests_root)

    async def reap_orphans(self, guests_root: Path) -> list[OrphanVMM]:
        """See ``OrphanReaper.reap``. Call it once at server start, before ``adopt``."""
        return await self._orphans.reap(guests_root)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _close_opened(opening: asyncio.Future[int]) -> None:
    """Done-callback of a TAP open whose launch was cancelled: nobody else will close it."""
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())
