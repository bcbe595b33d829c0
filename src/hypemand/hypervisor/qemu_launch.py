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
from hypemand.fsutil import write_model_atomic
from hypemand.hypervisor.base import Accel, VMConfig, VMPaths
from hypemand.hypervisor.qemu_cmdline import guest_mac

INCOMING_DEFER = ["-incoming", "defer"]


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

    def fresh_argv(self) -> list[str]:
        """The recorded command line without the ``-incoming defer`` a restore appended."""
        return self.argv[:-2] if self.argv[-2:] == INCOMING_DEFER else list(self.argv)

    def for_restore(self, directory: Path) -> QemuLaunchRecord:
        """The launch that loads this VM's saved state in ``directory`` (possibly a copy)."""
        config = self.config.model_copy(update={"directory": directory})
        return self.model_copy(update={
            "config": config, "argv": [*self.fresh_argv(), *INCOMING_DEFER], "launched_at": datetime.now(UTC),
        })

    def for_fork(self, directory: Path, vm_id: str) -> QemuLaunchRecord:
        """The launch of a fork of this VM, copied into ``directory`` as ``vm_id``."""
        config = self.config.model_copy(update={"vm_id": vm_id, "directory": directory})
        return self.model_copy(update={"config": config, "argv": fork_argv(self.fresh_argv(), vm_id)})


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


def prepare_fresh_boot(launch: QemuLaunchRecord) -> None:
    """Blocking: unlinking a RAM file of gigabytes takes a while, and the record is fsynced."""
    paths = launch.config.paths
    # Leftovers of an earlier run: stale sockets, and RAM that a fresh boot must not see.
    for stale in (paths.control_socket, paths.agent_socket, paths.memory_file):
        stale.unlink(missing_ok=True)
    launch.save()


def prepare_restore(launch: QemuLaunchRecord) -> None:
    """Blocking. Unlike a fresh boot, the RAM file is the saved VM's and must be there."""
    paths = launch.config.paths
    for stale in (paths.control_socket, paths.agent_socket):
        stale.unlink(missing_ok=True)
    if not paths.memory_file.exists():
        raise Conflict(f"{paths.directory.name}: the saved VM's RAM file is missing", code="snapshot_corrupt")
    launch.save()
