"""The QEMU backend: boards ``qemu-microvm`` (microvm) and ``qemu`` (q35).

Lifecycle of a VMM process:
- ``start`` writes ``qemu-config.json`` (the launch contract: config, argv, QEMU version), starts
  QEMU in its own session with cwd = VM directory, records its identity in ``vmm.json`` at once,
  and waits until QMP answers. QEMU is never only our child: it survives the server, and exit is
  observed through a pidfd, which works for adopted processes too.
- ``adopt`` re-attaches after a server restart: ``vmm.json`` must name a live process with the
  recorded start time, boot id and working directory, and its command line must be exactly the
  recorded argv. Anything else is refused (a reused PID is never signalled).
- Starting a VM whose directory already has a live VMM raises ``Conflict``: the caller decides
  (``adopt`` it, or shut it down first). A start silently returning the old VM could hand back a
  VM with a different configuration than the one asked for.
- ``reap_orphans`` ends the QEMUs that no ``vmm.json`` names: a server that died between spawning
  QEMU and recording it leaves one that nothing adopts and that holds its overlay disk's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel
from qemu.qmp import ExecuteError, QMPClient, QMPError

from hypemand.errors import Conflict, DependencyMissing, InvalidState
from hypemand.fsutil import exclusive_lock, write_model_atomic
from hypemand.hypervisor.base import (
    LAUNCH_RECORD,
    MEMORY_FILE,
    PROCESS_RECORD,
    Accel,
    Capabilities,
    ForkIdentity,
    Hypervisor,
    ShutdownOutcome,
    VMConfig,
    VMHandle,
    VMMError,
    VMStatus,
)
from hypemand.hypervisor.process import (
    ProcessRecord,
    ProcessWatch,
    host_boot_id,
    list_pids,
    process_cmdline,
    process_cwd,
    process_exe,
    process_start_time,
)
from hypemand.hypervisor.qemu_cmdline import QMP_SOCKET, build_qemu_argv, guest_mac, machine_type
from hypemand.hypervisor.qemu_host import (
    AccelDecision,
    find_qemu_binary,
    host_tsc_khz,
    probe_acceleration,
    qemu_version,
)
from hypemand.unixsock import connect_unix

log = logging.getLogger(__name__)

START_LOCK = ".vmm.lock"
QMP_READY_TIMEOUT = 15.0  # process start -> QMP answering; ~40 ms when idle, more under load
QMP_POLL_INTERVAL = 0.005  # QMP is usually up ~40 ms after spawn: poll finely, it costs a connect()
QUIT_TIMEOUT = 5.0
# A power button press the guest cannot see yet (its ACPI button driver still loading) is lost,
# so the button is pressed again at this interval until the guest powers off or time runs out.
POWER_BUTTON_REPEAT = 1.0
KILL_TIMEOUT = 10.0

_KNOWN_STATUSES = {status.value for status in VMStatus}


class QemuLaunchRecord(BaseModel):
    """``qemu-config.json``: how this VM was launched, so it can be relaunched identically.

    A migration stream (standby/snapshot) holds RAM and device state but not the command line;
    restore must run the recorded ``argv`` (plus ``-incoming defer``) with the same QEMU version.
    """

    format_version: Literal[1] = 1
    hypervisor: Literal["qemu"] = "qemu"
    qemu_version: str
    qemu_binary: str
    machine: str
    accel: Accel
    tsc_khz: int | None
    config: VMConfig  # with ``accel`` resolved
    argv: list[str]
    launched_at: datetime

    @classmethod
    def load(cls, directory: Path) -> QemuLaunchRecord | None:
        try:
            return cls.model_validate_json((directory / LAUNCH_RECORD).read_bytes())
        except (FileNotFoundError, ValueError):
            return None


@dataclass(frozen=True)
class OrphanVMM:
    """A QEMU running the recorded launch of a VM directory whose ``vmm.json`` does not name it."""

    pid: int
    start_time: int  # /proc/<pid>/stat field 22: with the PID, the process' identity
    directory: Path
    vm_id: str
    reason: str  # why no record claims it, for the log


class _QmpChannel:
    """One lazily (re)connected QMP session. QEMU's QMP socket serves one client at a time."""

    def __init__(self, socket_path: Path, name: str) -> None:
        self._socket_path = socket_path
        self._name = name
        self._client: QMPClient | None = None
        self._lock = asyncio.Lock()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        client = await self._connected()
        try:
            return await client.execute(command, arguments)
        except ExecuteError:
            raise
        except (QMPError, OSError, EOFError):
            await self.close()
            raise

    async def _connected(self) -> QMPClient:
        async with self._lock:
            if self._client is not None:
                if self._client.runstate.name == "RUNNING":
                    return self._client
                await self._close_locked()
            client = QMPClient(self._name)
            try:
                await client.connect(connect_unix(self._socket_path))
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                raise
            self._client = client
            return client

    async def close(self) -> None:
        async with self._lock:
            await self._close_locked()

    async def _close_locked(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # The server hanging up (quit, exit) surfaces here as EOFError: expected.
            with contextlib.suppress(Exception):
                await client.disconnect()


class QemuVMHandle(VMHandle):
    def __init__(self, launch: QemuLaunchRecord, record: ProcessRecord, watch: ProcessWatch) -> None:
        self.config = launch.config
        self.launch = launch
        self.record = record
        self._watch = watch
        self._qmp = _QmpChannel(self.directory / QMP_SOCKET, name=f"hypemand-{self.vm_id}")
        self.migration_ready = False

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def memory_file(self) -> Path:
        return self.directory / MEMORY_FILE

    def is_alive(self) -> bool:
        return self._watch.is_alive()

    def exit_status(self) -> str:
        return self._watch.exit_status()

    async def qmp(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-command bound, callers rarely change it
    ) -> Any:
        """Run one QMP command. Public for QEMU-specific features (standby, snapshot, migration)."""
        if not self.is_alive():
            raise InvalidState(f"VM {self.vm_id}: the QEMU process has exited")
        try:
            async with asyncio.timeout(timeout):
                return await self._qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise InvalidState(f"VM {self.vm_id}: QMP {command}: {exc}") from exc
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            if not self.is_alive():
                raise InvalidState(f"VM {self.vm_id}: the QEMU process has exited") from exc
            raise VMMError(f"VM {self.vm_id}: QMP {command} failed: {exc!r}") from exc

    async def status(self, timeout: float = 2.0) -> VMStatus:  # noqa: ASYNC109
        if not self.is_alive():
            return VMStatus.EXITED
        try:
            reply = await self.qmp("query-status", timeout=timeout)
        except (VMMError, InvalidState):
            return VMStatus.UNKNOWN if self.is_alive() else VMStatus.EXITED
        value = reply.get("status") if isinstance(reply, dict) else None
        return VMStatus(value) if value in _KNOWN_STATUSES else VMStatus.UNKNOWN

    async def prepare_migration(self) -> None:
        """Migration settings every save and restore uses: RAM in the shared file is not sent
        (x-ignore-shared), and no bandwidth limit (QEMU's default of 128 MiB/s applies to a
        stopped VM too)."""
        await self.qmp("migrate-set-capabilities", {"capabilities": [_IGNORE_SHARED]})
        await self.qmp("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
        self.migration_ready = True

    async def pause(self) -> None:
        await self.qmp("stop")

    async def resume(self) -> None:
        await self.qmp("cont")

    async def shutdown(self, timeout: float = 10.0) -> ShutdownOutcome:  # noqa: ASYNC109
        if not self.is_alive():
            return ShutdownOutcome.ALREADY_EXITED
        try:
            # A paused guest cannot react to the power button; go straight to quit.
            if await self.status() is VMStatus.RUNNING:
                with contextlib.suppress(VMMError, InvalidState):
                    if await self._press_power_button_until_exit(timeout):
                        return ShutdownOutcome.GUEST_POWEROFF
            if self.is_alive():
                with contextlib.suppress(VMMError, InvalidState):
                    # QEMU may hang up before the reply arrives; the exit wait below decides.
                    await self.qmp("quit", timeout=QUIT_TIMEOUT)
                if await self.wait_exit(QUIT_TIMEOUT):
                    return ShutdownOutcome.VMM_QUIT
            else:
                return ShutdownOutcome.GUEST_POWEROFF
            await self.kill()
            return ShutdownOutcome.KILLED
        finally:
            if not self.is_alive():
                await self._discard_memory_file()

    async def _press_power_button_until_exit(self, timeout: float) -> bool:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.qmp("system_powerdown")
            remaining = deadline - loop.time()
            if await self.wait_exit(max(0.0, min(POWER_BUTTON_REPEAT, remaining))):
                return True
            if loop.time() >= deadline:
                return False

    async def kill(self, keep_memory: bool = False) -> None:
        self._watch.send_signal(signal.SIGKILL)
        if not await self.wait_exit(KILL_TIMEOUT):
            raise VMMError(f"VM {self.vm_id}: QEMU (pid {self.pid}) survived SIGKILL for {KILL_TIMEOUT} s")
        if not keep_memory:
            await self._discard_memory_file()

    async def wait_exit(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        exited = await self._watch.wait(timeout)
        if exited:
            await self._qmp.close()
        return exited

    async def close(self) -> None:
        await self._qmp.close()
        self._watch.close()

    async def _discard_memory_file(self) -> None:
        # The RAM of a VM that ended is garbage; a standby keeps it by never calling shutdown/kill.
        await asyncio.to_thread(_remove_memory_file, self.directory)


class QemuHypervisor(Hypervisor):
    name: ClassVar[str] = "qemu"

    def __init__(
        self, state_dir: Path | None = None, binary: Path | None = None, forced_accel: Accel | None = None
    ) -> None:
        """``state_dir`` holds host-wide caches (the acceleration decision); None: no caching.
        ``binary`` and ``forced_accel`` come from the settings (HYPEMAND_QEMU, HYPEMAND_ACCEL)."""
        self._state_dir = state_dir
        self._configured_binary = binary
        self._binary = binary
        self._forced_accel = forced_accel
        self._accel: AccelDecision | None = None
        self._accel_lock = asyncio.Lock()

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
            pause=True, graceful_shutdown=True, user_networking=True, disk_io_limit=False,
            snapshot=True, standby=True, live_snapshot=True, fork=True,
        )

    async def acceleration(self) -> AccelDecision:
        async with self._accel_lock:
            # A decision is about one QEMU version: an upgraded binary is decided afresh.
            version = await asyncio.to_thread(self.version)
            if self._accel is None or self._accel.qemu_version != version:
                self._accel = await probe_acceleration(
                    self.binary, self._state_dir, forced=self._forced_accel
                )
            return self._accel

    async def start(self, config: VMConfig) -> QemuVMHandle:
        directory = config.directory
        directory.mkdir(parents=True, exist_ok=True)
        config.paths.console_log.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(directory / START_LOCK, f"another start of the VM in {directory} is in progress"):
            existing = await self._adopt_unlocked(directory, connect=False)
            if existing is not None:
                await existing.close()
                raise Conflict(
                    f"VM {config.vm_id}: QEMU is already running in {directory} (pid {existing.pid})"
                )

            accel = config.accel or (await self.acceleration()).accel
            # Off the event loop: the first TSC measurement sleeps 50 ms, and a changed QEMU
            # binary is asked for its version.
            tsc_khz = await asyncio.to_thread(host_tsc_khz) if accel is Accel.TCG else None
            version = await asyncio.to_thread(self.version)
            resolved = config.model_copy(update={"accel": accel})
            argv = build_qemu_argv(resolved, binary=self.binary, accel=accel, tsc_khz=tsc_khz)
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
            await asyncio.to_thread(_prepare_directory, launch)
            return await self._launch(launch)

    async def _launch(self, launch: QemuLaunchRecord) -> QemuVMHandle:
        config = launch.config
        directory = config.directory
        started = time.monotonic()
        vmm_log = config.paths.vmm_log
        spawning = asyncio.ensure_future(asyncio.to_thread(_spawn, launch.argv, directory, vmm_log))
        try:
            # Shielded: a cancellation cannot stop the thread, and the QEMU it starts must not be
            # left running unrecorded (it would hold the overlay disk's write lock).
            child = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await _kill_child(await spawning)
            raise
        try:
            try:
                record = ProcessRecord.for_child(child.pid, directory, config.vm_id, launch.qemu_binary)
            except ProcessLookupError:
                raise VMMError(
                    f"VM {config.vm_id}: QEMU exited at once: {_log_tail(config.paths.vmm_log)}"
                ) from None
            await asyncio.to_thread(record.save, config.paths.process_record)  # fsynced
            watch = ProcessWatch.open(record, child=child)
            if watch is None:
                why = record.mismatch() or "gone"
                raise VMMError(
                    f"VM {config.vm_id}: QEMU (pid {child.pid}) is not the process just started ({why}), "
                    f"exit status {child.poll()}: {_log_tail(config.paths.vmm_log)}"
                )
        except BaseException:
            await _kill_child(child)
            raise
        handle = QemuVMHandle(launch, record, watch)
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

    async def _wait_for_qmp(self, handle: QemuVMHandle) -> None:
        deadline = time.monotonic() + QMP_READY_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not handle.is_alive():
                raise VMMError(
                    f"VM {handle.vm_id}: QEMU (pid {handle.pid}) exited during startup "
                    f"(status {handle.exit_status()}): {_log_tail(handle.vmm_log_path)}"
                )
            try:
                await handle.qmp("query-status", timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                # Done now, at no one's expense, rather than on the standby's pause path.
                await handle.prepare_migration()
                return
            except (VMMError, InvalidState) as exc:
                last_error = exc
            await asyncio.sleep(QMP_POLL_INTERVAL)
        raise VMMError(f"VM {handle.vm_id}: QMP did not answer within {QMP_READY_TIMEOUT} s: {last_error}")

    # ---- standby, snapshots, fork --------------------------------------------------------------
    # Guest RAM is a shared file mapping (memory-backend-file, share=on), so with QEMU's
    # x-ignore-shared migration capability the migration stream holds device state only: saving
    # costs the same for 256 MiB and 16 GiB. QEMU 7.2 has no file: URI; an exec: URI writes it.

    async def save_state(self, handle: VMHandle, state_file: Path) -> None:
        assert isinstance(handle, QemuVMHandle)
        if not handle.migration_ready:  # a VM adopted from a server that did not prepare it
            await handle.prepare_migration()
        # Callers save running VMs (the instance layer checks): the pause below is ours to undo.
        await handle.qmp("stop")
        partial = state_file.with_name(f".{state_file.name}.partial")
        try:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            await handle.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(partial))}"})
            await _wait_for_migration(handle, "saving the device state")
            await asyncio.to_thread(_fsync_and_rename, partial, state_file)
        except BaseException:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            if handle.is_alive():
                with contextlib.suppress(VMMError, InvalidState):
                    await handle.qmp("cont")
            raise

    async def end_saved(self, handle: VMHandle) -> None:
        assert isinstance(handle, QemuVMHandle)
        with contextlib.suppress(VMMError, InvalidState):
            # QEMU may hang up before it answers; the exit wait decides.
            await handle.qmp("quit", timeout=QUIT_TIMEOUT)
        if not await handle.wait_exit(QUIT_TIMEOUT):
            await handle.kill(keep_memory=True)
        await handle.close()

    def check_restorable(self, directory: Path) -> None:
        launch = QemuLaunchRecord.load(directory)
        if launch is None:
            raise Conflict(f"{directory.name}: no launch record to restore from")
        running = self.version()
        if launch.qemu_version != running:
            raise Conflict(
                f"the saved VM was made by QEMU {launch.qemu_version}; this host runs QEMU {running}, "
                "which cannot load its device state",
                code="incompatible_snapshot",
            )
        if launch.machine != machine_type(launch.config.board):
            raise Conflict(f"the saved VM's board {launch.machine} does not match its recorded board",
                           code="incompatible_snapshot")

    def prepare_fork(self, directory: Path, fork: ForkIdentity) -> None:
        launch = QemuLaunchRecord.load(directory)
        if launch is None:
            raise Conflict(f"{directory.name}: no launch record to fork from")
        argv = launch.argv[:-2] if launch.argv[-2:] == ["-incoming", "defer"] else list(launch.argv)
        config = launch.config.model_copy(update={"vm_id": fork.vm_id, "directory": directory})
        write_model_atomic(
            directory / LAUNCH_RECORD,
            launch.model_copy(update={"config": config, "argv": fork_argv(argv, fork.vm_id)}),
        )

    async def restore(self, directory: Path, state_file: Path) -> QemuVMHandle:
        with exclusive_lock(directory / START_LOCK, f"another start of the VM in {directory} is in progress"):
            existing = await self._adopt_unlocked(directory, connect=False)
            if existing is not None:
                await existing.close()
                raise Conflict(f"VM in {directory}: QEMU is already running (pid {existing.pid})")
            await asyncio.to_thread(self.check_restorable, directory)
            launch = QemuLaunchRecord.load(directory)
            assert launch is not None
            argv = [arg for arg in launch.argv]
            if argv[-2:] == ["-incoming", "defer"]:
                argv = argv[:-2]
            config = launch.config.model_copy(update={"directory": directory})
            restored = launch.model_copy(update={
                "config": config, "argv": [*argv, "-incoming", "defer"], "launched_at": datetime.now(UTC),
            })
            await asyncio.to_thread(_prepare_restore, restored)
            handle = await self._launch(restored)
        try:
            # _launch prepared migration (x-ignore-shared), which the destination needs too.
            await handle.qmp("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state_file))}"})
            await _wait_for_incoming(handle)
            await handle.qmp("cont")
        except BaseException:
            if handle.is_alive():
                await handle.kill(keep_memory=True)
            await handle.close()
            raise
        return handle

    async def adopt(self, directory: Path) -> QemuVMHandle | None:
        return await self._adopt_unlocked(directory, connect=True)

    # --- orphans: QEMUs spawned by a server that died before writing vmm.json ---------------

    def find_orphans(self, guests_root: Path) -> list[OrphanVMM]:
        """The QEMU processes running a VM directory directly under ``guests_root`` that are not
        that directory's recorded VMM. Signals nothing. Blocking (reads /proc): async code calls
        ``reap_orphans`` or runs this in a thread.

        A process counts only if all of these hold: its cwd is a directory directly under
        ``guests_root``; its command line equals that directory's ``qemu-config.json`` argv; its
        executable is the QEMU binary (the one the record names or this backend's, also after an
        upgrade replaced the file); and that directory's ``vmm.json`` is missing, unreadable or
        names another process.
        """
        root = guests_root.resolve()
        return [orphan for pid in list_pids() if (orphan := self._as_orphan(pid, root)) is not None]

    async def reap_orphans(self, guests_root: Path) -> list[OrphanVMM]:
        """SIGKILL (through a pidfd) every process ``find_orphans`` reports. Returns the ones
        ended. Their RAM files are kept: an orphan may be a restore of a saved VM.

        Meant for server start, before VMs are adopted or started. Safe at any time: each orphan is
        re-checked after its pidfd is open, and a directory whose start lock is held (a start
        between spawning QEMU and writing vmm.json looks exactly like an orphan) is skipped.
        """
        root = await asyncio.to_thread(guests_root.resolve)
        reaped = []
        for orphan in await asyncio.to_thread(self.find_orphans, root):
            try:
                with exclusive_lock(orphan.directory / START_LOCK, "a start is in progress"):
                    ended = await self._kill_orphan(orphan, root)
            except Conflict:
                log.info("VM %s: not reaping pid %d: a start is in progress", orphan.vm_id, orphan.pid)
                continue
            if ended:
                reaped.append(orphan)
        return reaped

    async def _kill_orphan(self, orphan: OrphanVMM, root: Path) -> bool:
        watch = ProcessWatch.open_verified(orphan.pid, lambda: self._as_orphan(orphan.pid, root) == orphan)
        if watch is None:
            return False  # gone, or no longer an orphan (adopted, PID reused)
        try:
            log.warning(
                "VM %s: killing orphaned QEMU pid %d in %s (%s)",
                orphan.vm_id,
                orphan.pid,
                orphan.directory,
                orphan.reason,
            )
            watch.send_signal(signal.SIGKILL)
            if not await watch.wait(KILL_TIMEOUT):
                log.error("VM %s: orphaned QEMU pid %d survived SIGKILL", orphan.vm_id, orphan.pid)
                return False
        finally:
            watch.close()
        # The RAM file stays: the orphan may be a restore that was being started from a saved
        # VM, whose RAM it is. A later fresh boot of the directory replaces it anyway.
        return True

    def _as_orphan(self, pid: int, root: Path) -> OrphanVMM | None:
        """``pid`` as an orphan of a VM directory under ``root`` (resolved), or None."""
        directory = process_cwd(pid)
        if directory is None or directory.parent != root:
            return None
        start_time = process_start_time(pid)
        launch = QemuLaunchRecord.load(directory)
        if start_time is None or launch is None or process_cmdline(pid) != launch.argv:
            return None
        if not self._runs_qemu_binary(pid, launch):
            return None
        record = ProcessRecord.load(directory / PROCESS_RECORD)
        if record is None:
            reason = f"no valid {PROCESS_RECORD}"
        elif (record.pid, record.start_time, record.boot_id) == (pid, start_time, host_boot_id()):
            return None  # the recorded VMM: adopt() takes it
        else:
            reason = f"{PROCESS_RECORD} names another process (pid {record.pid})"
        if process_start_time(pid) != start_time:
            return None  # the PID was reused while we looked
        return OrphanVMM(
            pid=pid, start_time=start_time, directory=directory, vm_id=launch.config.vm_id, reason=reason
        )

    def _runs_qemu_binary(self, pid: int, launch: QemuLaunchRecord) -> bool:
        exe = process_exe(pid)
        if exe is None:
            return False
        binaries = [launch.qemu_binary]
        with contextlib.suppress(DependencyMissing):
            binaries.append(str(self.binary))
        # A binary replaced (upgraded) since the process started reads as "<path> (deleted)".
        exe_path = exe.removesuffix(" (deleted)")
        for binary in binaries:
            if exe_path == str(Path(binary).resolve()):
                return True
            with contextlib.suppress(OSError):
                if os.path.samefile(f"/proc/{pid}/exe", binary):
                    return True
        return False

    async def _adopt_unlocked(self, directory: Path, *, connect: bool) -> QemuVMHandle | None:
        record = ProcessRecord.load(directory / PROCESS_RECORD)
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
        handle = QemuVMHandle(launch, record, watch)
        if connect:
            # Best effort: the VM is ours either way; status() reports UNKNOWN while QMP is busy.
            try:
                await handle.qmp("query-status", timeout=2.0)
            except (VMMError, InvalidState) as exc:
                log.warning("VM %s: adopted pid %d but QMP did not answer: %s", record.vm_id, record.pid, exc)
        return handle


def _spawn(argv: list[str], directory: Path, vmm_log_path: Path) -> subprocess.Popen[bytes]:
    with open(vmm_log_path, "ab") as vmm_log:
        vmm_log.write(f"--- {datetime.now(UTC).isoformat()} starting {' '.join(argv)}\n".encode())
        vmm_log.flush()
        return subprocess.Popen(
            argv,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=vmm_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: a server restart neither kills nor signals it
            close_fds=True,
        )


def _prepare_directory(launch: QemuLaunchRecord) -> None:
    """Blocking: unlinking a RAM file of gigabytes takes a while, and the record is fsynced."""
    directory = launch.config.directory
    # Leftovers of an earlier run: stale sockets, and RAM that a fresh boot must not see.
    for stale in (QMP_SOCKET, launch.config.agent_socket, MEMORY_FILE):
        (directory / stale).unlink(missing_ok=True)
    write_model_atomic(directory / LAUNCH_RECORD, launch)


def _remove_memory_file(directory: Path) -> None:
    """Blocking (freeing the guest RAM's blocks): run it in a thread from async code."""
    (directory / MEMORY_FILE).unlink(missing_ok=True)


async def _kill_child(child: subprocess.Popen[bytes]) -> None:
    """Stop and reap a QEMU we spawned but could not take charge of."""
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    # Reaped in a thread: tearing down a large guest takes a moment. Should this wait itself be
    # cancelled, the thread still reaps the child.
    await asyncio.to_thread(child.wait)


def _log_tail(path: Path, limit: int = 1500) -> str:
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - limit))
            return log_file.read().decode(errors="replace").strip() or "(vmm.log is empty)"
    except OSError:
        return "(no vmm.log)"


_IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}
MIGRATION_BANDWIDTH = 1 << 40
MIGRATION_TIMEOUT = 120.0
_MIGRATION_POLL = 0.002


async def _wait_for_migration(handle: QemuVMHandle, what: str) -> None:
    """Poll an outgoing migration until it completes; raise VMMError if it fails."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    delay = _MIGRATION_POLL
    while True:
        info = await handle.qmp("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMMError(f"VM {handle.vm_id}: {what} failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            with contextlib.suppress(VMMError, InvalidState):
                await handle.qmp("migrate_cancel")
            raise VMMError(f"VM {handle.vm_id}: {what} did not finish within {MIGRATION_TIMEOUT:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _wait_for_incoming(handle: QemuVMHandle) -> None:
    """Wait until an incoming migration has loaded (the VM is then paused)."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    delay = _MIGRATION_POLL
    while True:
        if not handle.is_alive():
            raise VMMError(f"VM {handle.vm_id}: QEMU exited while loading the saved state: "
                           f"{_log_tail(handle.vmm_log_path)}")
        info = await handle.qmp("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status == "failed":
            detail = info.get("error-desc", status)
            raise VMMError(f"VM {handle.vm_id}: loading the saved state failed: {detail}")
        if time.monotonic() > deadline:
            raise VMMError(f"VM {handle.vm_id}: loading the saved state took over {MIGRATION_TIMEOUT:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def fork_argv(argv: list[str], vm_id: str) -> list[str]:
    """The command line of a fork: its own name and MAC, and the RAM file mapped privately
    (share=off), so that the guest's writes stay in the fork's memory and never reach the file
    that other forks map too."""
    rewritten = list(argv)
    for index, arg in enumerate(rewritten):
        if index > 0 and rewritten[index - 1] == "-name":
            rewritten[index] = vm_id
        elif arg.startswith("memory-backend-file,"):
            rewritten[index] = arg.replace(",share=on", ",share=off")
        elif ",netdev=net0," in arg and ",mac=" in arg:
            rewritten[index] = re.sub(r",mac=[0-9a-f:]+", f",mac={guest_mac(vm_id)}", arg)
    return rewritten


def _prepare_restore(launch: QemuLaunchRecord) -> None:
    directory = launch.config.directory
    for stale in (QMP_SOCKET, launch.config.agent_socket):
        (directory / stale).unlink(missing_ok=True)
    if not (directory / MEMORY_FILE).exists():
        raise Conflict(f"{directory.name}: the saved VM's RAM file is missing", code="snapshot_corrupt")
    write_model_atomic(directory / LAUNCH_RECORD, launch)


def _fsync_and_rename(partial: Path, final: Path) -> None:
    with open(partial, "rb") as state:
        os.fsync(state.fileno())
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
