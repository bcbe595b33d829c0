"""The launch record ``qemu-config.json``: how a VM was launched, so it can be relaunched.

A migration stream (standby, snapshot) holds RAM and device state but not the command line, so
a restore runs the recorded ``argv`` (plus ``-incoming defer``) with the same QEMU version, and a
fork runs a copy of it rewritten for its own identity. Everything that derives one launch from
another lives here; starting the process is ``qemu.QemuHypervisor``'s job.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from hypemand.errors import Conflict
from hypemand.fsutil import is_no_space, write_model_atomic
from hypemand.hypervisor.base import Accel, VMConfig, VMPaths
from hypemand.hypervisor.qemu_cmdline import guest_mac, tap_netdev
from hypemand.hypervisor.storage import MIB, no_space, reserve_memory_file

INCOMING_DEFER = ["-incoming", "defer"]
_TAP_NETDEV = re.compile(r"^tap,(.*,)?fd=[0-9]+(,|$)")


class QemuLaunchRecord(BaseModel):
    """``qemu-config.json``: how this VM was launched, so it can be relaunched identically."""

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
            return cls.model_validate_json(VMPaths(directory).launch_record.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def save(self) -> None:
        """Blocking (fsynced): run it in a thread from async code."""
        write_model_atomic(self.config.paths.launch_record, self)

    @property
    def maps_memory_shared(self) -> bool:
        """True when QEMU maps the RAM file shared (its own RAM: guest writes reach the file);
        False for a fork, which maps a file shared with other forks privately (share=off)."""
        backend = next(arg for arg in self.argv if arg.startswith("memory-backend-file,"))
        return ",share=on" in f"{backend},"

    def fresh_argv(self) -> list[str]:
        """The recorded command line without the ``-incoming defer`` a restore appended."""
        return self.argv[:-2] if self.argv[-2:] == INCOMING_DEFER else list(self.argv)

    def for_restore(self, directory: Path) -> QemuLaunchRecord:
        """The launch that loads this VM's saved state in ``directory`` (possibly a copy)."""
        config = self.config.model_copy(update={"directory": directory})
        return self.model_copy(update={
            "config": config, "argv": [*self.fresh_argv(), *INCOMING_DEFER], "launched_at": datetime.now(UTC),
        })

    def for_fork(self, directory: Path, vm_id: str, mac: str | None = None) -> QemuLaunchRecord:
        """The launch of a fork of this VM, copied into ``directory`` as ``vm_id``, its NIC with
        ``mac`` (None: ``guest_mac(vm_id)``)."""
        config = self.config.model_copy(update={"vm_id": vm_id, "directory": directory, "nic_mac": mac})
        argv = fork_argv(self.fresh_argv(), vm_id, mac)
        return self.model_copy(update={"config": config, "argv": argv})

    def with_tap_fd(self, fd: int) -> QemuLaunchRecord:
        """This launch with its TAP on descriptor ``fd``: the number differs at every launch, and
        the record names the one QEMU really got (adoption compares QEMU's command line with it)."""
        return self.model_copy(update={"argv": tap_fd_argv(self.argv, fd)})


def fork_argv(argv: list[str], vm_id: str, mac: str | None = None) -> list[str]:
    """The command line of a fork: its own name and MAC (``mac``, else ``guest_mac(vm_id)``), and
    the RAM file mapped privately (share=off), so that the guest's writes stay in the fork's
    memory and never reach the file that other forks map too."""
    rewritten = list(argv)
    for index, arg in enumerate(rewritten):
        if index > 0 and rewritten[index - 1] == "-name":
            rewritten[index] = vm_id
        elif arg.startswith("memory-backend-file,"):
            rewritten[index] = arg.replace(",share=on", ",share=off")
        elif ",netdev=net0," in arg and ",mac=" in arg:
            rewritten[index] = re.sub(r",mac=[0-9a-f:]+", f",mac={mac or guest_mac(vm_id)}", arg)
    return rewritten


def tap_fd_argv(argv: list[str], fd: int) -> list[str]:
    """``argv`` with its TAP backend on descriptor ``fd``. ValueError if it has no TAP NIC."""
    rewritten = list(argv)
    for index, arg in enumerate(rewritten):
        if index > 0 and rewritten[index - 1] == "-netdev" and _TAP_NETDEV.match(arg):
            rewritten[index] = tap_netdev(fd)
            return rewritten
    raise ValueError("the command line has no TAP NIC (-netdev tap,...,fd=N)")


def prepare_fresh_boot(launch: QemuLaunchRecord) -> None:
    """Blocking: unlinking a RAM file of gigabytes takes a while, and the record is fsynced.

    The new RAM file's blocks are reserved (``storage.reserve_memory_file``); without the space
    this raises ``InsufficientStorage`` and leaves no RAM file and no new launch record."""
    paths = launch.config.paths
    # Leftovers of an earlier run: stale sockets, the last VMM's exit record, and RAM that a
    # fresh boot must not see.
    for stale in (paths.control_socket, paths.agent_socket, paths.vmm_exit_record, paths.memory_file):
        stale.unlink(missing_ok=True)
    reserve_memory_file(paths.memory_file, launch.config.memory_mib * MIB, fresh=True)
    try:
        launch.save()
    except BaseException as exc:
        paths.memory_file.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space("writing the launch record", paths.directory) from exc
        raise


def prepare_restore(launch: QemuLaunchRecord) -> None:
    """Blocking. Unlike a fresh boot, the RAM file is the saved VM's and must be there. A VM's
    own RAM file (mapped shared) gets its holes reserved, like a fresh boot's; a fork's (mapped
    privately, copy-on-write) is never written and needs none."""
    paths = launch.config.paths
    for stale in (paths.control_socket, paths.agent_socket, paths.vmm_exit_record):
        stale.unlink(missing_ok=True)
    if not paths.memory_file.exists():
        raise Conflict(f"{paths.directory.name}: the saved VM's RAM file is missing", code="snapshot_corrupt")
    if launch.maps_memory_shared:
        reserve_memory_file(paths.memory_file, launch.config.memory_mib * MIB, fresh=False)
    try:
        launch.save()
    except OSError as exc:
        if is_no_space(exc):
            raise no_space("writing the launch record", paths.directory) from exc
        raise
