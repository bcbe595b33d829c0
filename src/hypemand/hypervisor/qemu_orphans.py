"""Orphaned QEMUs: processes a server spawned but died before recording in ``vmm.json``.

Such a QEMU is never adopted and keeps its overlay disk's write lock, so its VM cannot start
again. The reaper finds them by scanning /proc and ends them through a pidfd; see the README for
the exact conditions a process must meet to count as an orphan. An orphan's supervisor (the shim,
its parent) is never signalled: it records the kill and exits by itself, and the reaper waits
for that, so no late record lands in a directory that is being started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypemand.errors import Conflict, DependencyMissing
from hypemand.fsutil import exclusive_lock
from hypemand.hypervisor.base import PROCESS_RECORD, VMM_EXIT_RECORD, VMPaths
from hypemand.hypervisor.process import (
    ProcessRecord,
    ProcessWatch,
    host_boot_id,
    list_pids,
    parent_pid,
    process_cmdline,
    process_cwd,
    process_exe,
    process_start_time,
)
from hypemand.hypervisor.qemu_launch import QemuLaunchRecord
from hypemand.hypervisor.qemu_vm import KILL_TIMEOUT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrphanVMM:
    """A QEMU running the recorded launch of a VM directory whose ``vmm.json`` does not name it."""

    pid: int
    start_time: int  # /proc/<pid>/stat field 22: with the PID, the process' identity
    directory: Path
    vm_id: str
    reason: str  # why no record claims it, for the log
    supervisor_pid: int | None = None  # its shim, which records its exit, if it has one


class OrphanReaper:
    """Finds and ends orphaned QEMUs. ``backend_binary`` is the backend's QEMU binary (raises
    ``DependencyMissing`` when there is none): an orphan may run it or the one its record names."""

    def __init__(self, backend_binary: Callable[[], Path]) -> None:
        self._backend_binary = backend_binary

    def find(self, guests_root: Path) -> list[OrphanVMM]:
        """The QEMU processes running a VM directory directly under ``guests_root`` that are not
        that directory's recorded VMM. Signals nothing. Blocking (reads /proc): async code calls
        ``reap`` or runs this in a thread.

        A process counts only if all of these hold: its cwd is a directory directly under
        ``guests_root``; its command line equals that directory's ``qemu-config.json`` argv; its
        executable is the QEMU binary (the one the record names or this backend's, also after an
        upgrade replaced the file); and that directory's ``vmm.json`` is missing, unreadable or
        names another process.
        """
        root = guests_root.resolve()
        return [orphan for pid in list_pids() if (orphan := self._as_orphan(pid, root)) is not None]

    async def reap(self, guests_root: Path) -> list[OrphanVMM]:
        """SIGKILL (through a pidfd) every process ``find`` reports. Returns the ones ended.
        Their RAM files are kept: an orphan may be a restore of a saved VM.

        Meant for server start, before VMs are adopted or started. Safe at any time: each orphan is
        re-checked after its pidfd is open, and a directory whose start lock is held (a start
        between spawning QEMU and writing vmm.json looks exactly like an orphan) is skipped.
        """
        root = await asyncio.to_thread(guests_root.resolve)
        reaped = []
        for orphan in await asyncio.to_thread(self.find, root):
            try:
                with exclusive_lock(VMPaths(orphan.directory).start_lock, "a start is in progress"):
                    ended = await self._kill(orphan, root)
            except Conflict:
                log.info("VM %s: not reaping pid %d: a start is in progress", orphan.vm_id, orphan.pid)
                continue
            if ended:
                reaped.append(orphan)
        return reaped

    async def _kill(self, orphan: OrphanVMM, root: Path) -> bool:
        watch = ProcessWatch.open_verified(orphan.pid, lambda: self._as_orphan(orphan.pid, root) == orphan)
        if watch is None:
            return False  # gone, or no longer an orphan (adopted, PID reused)
        # Held before the kill: while its child is alive the shim cannot be replaced by another
        # process with its PID, and afterwards the pidfd keeps naming it.
        shim_pid = orphan.supervisor_pid
        supervisor = (
            ProcessWatch.open_verified(shim_pid, lambda: parent_pid(orphan.pid) == shim_pid)
            if shim_pid is not None
            else None
        )
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
            if supervisor is not None and not await supervisor.wait(KILL_TIMEOUT):
                log.error("VM %s: the supervisor (pid %d) of orphaned QEMU pid %d did not exit",
                          orphan.vm_id, supervisor.pid, orphan.pid)
        finally:
            watch.close()
            if supervisor is not None:
                supervisor.close()
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
        record = ProcessRecord.load(VMPaths(directory).process_record)
        if record is None:
            reason = f"no valid {PROCESS_RECORD}"
        elif (record.pid, record.start_time, record.boot_id) == (pid, start_time, host_boot_id()):
            return None  # the recorded VMM: adopt() takes it
        else:
            reason = f"{PROCESS_RECORD} names another process (pid {record.pid})"
        if process_start_time(pid) != start_time:
            return None  # the PID was reused while we looked
        return OrphanVMM(
            pid=pid,
            start_time=start_time,
            directory=directory,
            vm_id=launch.config.vm_id,
            reason=reason,
            supervisor_pid=self._supervisor_of(pid, directory, launch),
        )

    @staticmethod
    def _supervisor_of(pid: int, directory: Path, launch: QemuLaunchRecord) -> int | None:
        """The shim that started QEMU ``pid``: its parent, in the same directory, whose command
        line is the shim's (report fd, exit record name) followed by the recorded argv."""
        parent = parent_pid(pid)
        if parent is None or parent <= 1 or process_cwd(parent) != directory:
            return None
        cmdline = process_cmdline(parent)
        if cmdline[2:3] != [VMM_EXIT_RECORD] or cmdline[3:] != launch.argv:
            return None
        return parent

    def _runs_qemu_binary(self, pid: int, launch: QemuLaunchRecord) -> bool:
        exe = process_exe(pid)
        if exe is None:
            return False
        binaries = [launch.qemu_binary]
        with contextlib.suppress(DependencyMissing):
            binaries.append(str(self._backend_binary()))
        # A binary replaced (upgraded) since the process started reads as "<path> (deleted)".
        exe_path = exe.removesuffix(" (deleted)")
        for binary in binaries:
            if exe_path == str(Path(binary).resolve()):
                return True
            with contextlib.suppress(OSError):
                if os.path.samefile(f"/proc/{pid}/exe", binary):
                    return True
        return False
