"""The handle of one running QEMU: QMP commands, run state, and the ways it ends.

A handle holds the process through a pidfd (``process.ProcessWatch``), never by PID alone, and at
most one QMP session. Dropping or closing it never stops the VM; only ``shutdown`` and ``kill``
do, and they remove the RAM file of the VM that ended (a standby keeps it by never calling them).
It also holds QEMU's supervisor (the shim, QEMU's parent) while that runs, to know when the
supervisor has finished recording how QEMU ended (``exit_info``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPError

from hypemand.errors import InvalidState
from hypemand.hypervisor.base import (
    DiskIOStatus,
    ShutdownOutcome,
    VMHandle,
    VMMError,
    VMMExit,
    VMStatus,
    read_vmm_exit,
)
from hypemand.hypervisor.process import ProcessRecord, ProcessWatch
from hypemand.hypervisor.qemu_launch import QemuLaunchRecord
from hypemand.hypervisor.qemu_qmp import QmpChannel
from hypemand.hypervisor.storage import MIB, reserve_memory_file

QUIT_TIMEOUT = 5.0
# A power button press the guest cannot see yet (its ACPI button driver still loading) is lost,
# so the button is pressed again at this interval until the guest powers off or time runs out.
POWER_BUTTON_REPEAT = 1.0
KILL_TIMEOUT = 10.0
# A supervisor records the exit within milliseconds of QEMU's end (one small fsynced file).
SUPERVISOR_EXIT_TIMEOUT = 5.0
# ``announce``: QEMU's own defaults for the announcements after an incoming migration (ms), which
# the launch turns off there (``qemu_migration.prepare_migration``): a RARP from QEMU and, from a
# guest whose virtio-net driver can (VIRTIO_NET_F_GUEST_ANNOUNCE), its gratuitous ARP, unsolicited
# neighbour advertisements and multicast reports; 5 rounds over about a second.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}

_KNOWN_STATUSES = {status.value for status in VMStatus}
_KNOWN_IO_STATUSES = {status.value for status in DiskIOStatus}


class QemuVMHandle(VMHandle):
    def __init__(
        self,
        launch: QemuLaunchRecord,
        record: ProcessRecord,
        watch: ProcessWatch,
        supervisor: ProcessWatch | None = None,
    ) -> None:
        """``watch`` holds QEMU; ``supervisor`` its shim, if it still ran when the handle was made."""
        self.config = launch.config
        self.launch = launch
        self.record = record
        self._watch = watch
        self._supervisor = supervisor
        self._qmp = QmpChannel(self.config.paths.control_socket, name=f"hypemand-{self.vm_id}")
        # Set once the migration settings every save and restore needs are in place
        # (``qemu_migration.prepare_migration``).
        self.migration_ready = False

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def memory_file(self) -> Path:
        return self.config.paths.memory_file

    def is_alive(self) -> bool:
        return self._watch.is_alive()

    async def exit_info(self, timeout: float = SUPERVISOR_EXIT_TIMEOUT) -> VMMExit | None:  # noqa: ASYNC109
        if self.is_alive():
            return None
        # The shim writes the record right after QEMU ends; wait until it is done.
        if self._supervisor is not None:
            await self._supervisor.wait(timeout)
        ended = await asyncio.to_thread(read_vmm_exit, self.directory)
        if ended is None or (ended.pid, ended.start_time) != (self.pid, self.record.start_time):
            return None  # not this QEMU's (its shim was killed, or the record predates shims)
        return ended

    @property
    def has_nic(self) -> bool:
        return self.config.user_network or self.config.tap_network

    async def set_nic_link(self, up: bool) -> None:
        if not self.has_nic:
            raise InvalidState(f"VM {self.vm_id} has no NIC")
        # Named by its backend (net0): QEMU sets the link of the backend and of the NIC on it, and
        # the guest's virtio-net driver sees its carrier go down or up.
        await self.qmp("set_link", {"name": "net0", "up": up})

    async def announce(self) -> None:
        if self.has_nic:
            await self.qmp("announce-self", ANNOUNCE)

    @property
    def memory_bytes(self) -> int:
        return self.config.memory_mib * MIB

    def balloon_refusal(self, *, inflate: bool) -> str | None:
        if not self.config.balloon:
            return "the VM has no memory balloon (it was launched before it had one)"
        if inflate and not self.launch.maps_memory_shared:
            # QEMU 7.2 discards a ballooned page of a file mapping by punching a hole in the file,
            # also where it is mapped privately: a fork's RAM file is its snapshot's, shared by
            # every fork of it, whose memory would lose that page.
            return "a fork maps its snapshot's RAM file, which the balloon would punch holes in"
        return None

    async def guest_memory_bytes(self) -> int:
        if not self.config.balloon:
            return self.memory_bytes
        reply = await self.qmp("query-balloon")
        return int(reply["actual"])

    async def set_guest_memory_target(self, target_bytes: int) -> None:
        """Before a larger balloon, the RAM file is flushed: QEMU punches each page the guest
        gives out of the file, and the host kernel frees a page-cache folio only if it is clean
        then (a dirty large folio is kept whole: nothing returned, see README "Memory balloon").
        Before a smaller one, the file's blocks are reserved again (the guest will write there)."""
        target = max(MIB, min(target_bytes, self.memory_bytes))
        refusal = self.balloon_refusal(inflate=target < self.memory_bytes)
        if refusal is not None:
            raise InvalidState(f"VM {self.vm_id}: {refusal}")
        current = await self.guest_memory_bytes()
        if target < current and self.launch.maps_memory_shared:
            await asyncio.to_thread(_flush, self.memory_file)
        elif target > current:
            await self.reserve_guest_memory()
        await self.qmp("balloon", {"value": target})

    async def reserve_guest_memory(self) -> None:
        if self.launch.maps_memory_shared and self.is_alive():
            await asyncio.to_thread(reserve_memory_file, self.memory_file, self.memory_bytes, fresh=False)

    async def disk_io_status(self) -> dict[str, DiskIOStatus]:
        devices = await self.qmp("query-block")
        statuses = {}
        for device in devices if isinstance(devices, list) else []:
            name, io_status = device.get("device", ""), device.get("io-status")
            # Our drives are named disk<index of config.disks>; others (none today) are not ours.
            index = name.removeprefix("disk")
            if not index.isdigit() or int(index) >= len(self.config.disks):
                continue
            serial = self.config.disks[int(index)].serial
            if io_status is None:  # a device that does not track it
                statuses[serial] = DiskIOStatus.OK
            else:
                known = io_status in _KNOWN_IO_STATUSES
                statuses[serial] = DiskIOStatus(io_status) if known else DiskIOStatus.FAILED
        return statuses

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
                await self._await_exit_record()
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
        await self._await_exit_record()
        if not keep_memory:
            await self._discard_memory_file()

    async def _await_exit_record(self) -> None:
        """Let the supervisor finish recording the exit (milliseconds), so that a VM that
        ``kill`` or ``shutdown`` ended has its record and no process left in its directory."""
        if self._supervisor is not None:
            await self._supervisor.wait(SUPERVISOR_EXIT_TIMEOUT)

    async def wait_exit(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        exited = await self._watch.wait(timeout)
        if exited:
            await self._qmp.close()
        return exited

    async def close(self) -> None:
        await self._qmp.close()
        self._watch.close()
        if self._supervisor is not None:
            self._supervisor.close()

    async def _discard_memory_file(self) -> None:
        # The RAM of a VM that ended is garbage; a standby keeps it by never calling shutdown/kill.
        await asyncio.to_thread(_remove_memory_file, self.memory_file)


def _flush(memory_file: Path) -> None:
    """Write the RAM file's dirty pages to disk (blocking: as long as the guest's dirty memory)."""
    fd = os.open(memory_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _remove_memory_file(memory_file: Path) -> None:
    """Blocking (freeing the guest RAM's blocks): run it in a thread from async code."""
    memory_file.unlink(missing_ok=True)


def vmm_log_tail(path: Path, limit: int = 1500) -> str:
    """The end of a VMM's log, for an error message that says why QEMU failed."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - limit))
            return log_file.read().decode(errors="replace").strip() or "(vmm.log is empty)"
    except OSError:
        return "(no vmm.log)"
