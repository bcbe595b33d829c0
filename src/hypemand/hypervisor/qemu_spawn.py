"""Starting QEMU under its supervisor (the shim, see ``hypervisor.shim``), and the cases where a
just-started QEMU must be given up.

The shim is our child; QEMU is the shim's. The shim reports QEMU's pid on a pipe once ``exec``
succeeded, and QEMU is held by a pidfd opened while it is verifiably that shim's child running
in the VM directory, so no reused PID is ever taken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hypemand.hypervisor.base import VMM_EXIT_RECORD, VMPaths, read_vmm_exit
from hypemand.hypervisor.process import ProcessRecord, ProcessWatch, parent_pid, process_cwd
from hypemand.hypervisor.qemu_vm import KILL_TIMEOUT, SUPERVISOR_EXIT_TIMEOUT

log = logging.getLogger(__name__)

# The shim reports QEMU's pid right after exec (~1 ms); this bounds a wedged fork or exec.
SPAWN_REPORT_TIMEOUT = 30.0


@dataclass
class SpawnedVMM:
    supervisor: subprocess.Popen[bytes]  # the shim, our child
    vmm: ProcessWatch | None  # QEMU, held while it was verified as the shim's child; None: no QEMU


def spawn_supervised(
    shim: Path, argv: list[str], directory: Path, vmm_log_path: Path, vmm_fds: Sequence[int] = ()
) -> SpawnedVMM:
    """Start ``argv`` under the shim and learn QEMU's pid from it. Blocking (fork, exec, the
    shim's report): run it in a thread.

    ``vmm_fds`` (the VM's TAP) are inherited by QEMU under the same numbers, and by nothing else:
    the shim closes its copies once QEMU is forked. They are the caller's no longer: they are
    closed here as soon as the shim has them, or when it could not be started."""
    try:
        report_read, report_write = os.pipe()
    except BaseException:
        _close_all(vmm_fds)
        raise
    try:
        with open(vmm_log_path, "ab") as vmm_log:
            vmm_log.write(f"--- {datetime.now(UTC).isoformat()} starting {' '.join(argv)}\n".encode())
            vmm_log.flush()
            # The shim's first argument: the report pipe, then the descriptors QEMU keeps.
            given = ",".join(str(fd) for fd in (report_write, *vmm_fds))
            supervisor = subprocess.Popen(
                [str(shim), given, VMM_EXIT_RECORD, *argv],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=vmm_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: a server restart neither kills nor signals it
                close_fds=True,  # none of the server's descriptors but these
                pass_fds=(report_write, *vmm_fds),
            )
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
        _close_all(vmm_fds)
    try:
        report = _read_report(report_read)
    finally:
        os.close(report_read)
    if report is None:  # wedged: end the shim and whatever it started (its process group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)  # our unreaped child: the id is still its
        supervisor.wait()
        return SpawnedVMM(supervisor, None)
    if not report.strip().isdigit():
        return SpawnedVMM(supervisor, None)  # exec failed; the shim said why on stderr
    pid = int(report)
    resolved = directory.resolve()
    vmm = ProcessWatch.open_verified(
        pid, lambda: parent_pid(pid) == supervisor.pid and process_cwd(pid) == resolved
    )
    return SpawnedVMM(supervisor, vmm)


def _read_report(fd: int) -> str | None:
    """What the shim wrote to the report pipe until it closed it; None if it took too long."""
    deadline = time.monotonic() + SPAWN_REPORT_TIMEOUT
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 64)
            if not chunk:
                return data.decode(errors="replace")
            data += chunk


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def exit_description(spawned: SpawnedVMM, directory: Path) -> str:
    """How a QEMU that ended at once ended, from its shim's record."""
    await asyncio.to_thread(spawned.supervisor.wait)
    ended = await asyncio.to_thread(read_vmm_exit, directory)
    if ended is None or spawned.vmm is None or ended.pid != spawned.vmm.pid:
        return "no exit record"
    return ended.describe()


async def abandon(spawned: SpawnedVMM) -> None:
    """Stop a QEMU we spawned but could not take charge of, and reap its shim."""
    if spawned.vmm is not None:
        spawned.vmm.send_signal(signal.SIGKILL)
        await spawned.vmm.wait(KILL_TIMEOUT)
        spawned.vmm.close()
    # Reaped in a thread: the shim records the exit first. Should this wait itself be cancelled,
    # the thread still reaps it.
    await asyncio.to_thread(spawned.supervisor.wait)


async def await_previous_supervisor(directory: Path) -> None:
    """Let the shim of the directory's last QEMU finish its exit record before a new launch
    removes it: a record written after that would describe the wrong VMM."""
    record = await asyncio.to_thread(ProcessRecord.load, VMPaths(directory).process_record)
    supervisor = ProcessWatch.open_supervisor(record) if record is not None else None
    if supervisor is None:
        return
    try:
        if not await supervisor.wait(SUPERVISOR_EXIT_TIMEOUT):
            log.warning("VM in %s: the last QEMU's supervisor (pid %d) is still running",
                        directory, supervisor.pid)
    finally:
        supervisor.close()
