"""The server's view of the VMs in its data directory.

VMs outlive the server: QEMU runs in its own session, so stopping or crashing the server leaves
every guest running. At start the supervisor adopts each VM directory whose recorded VMM is still
alive (the hypervisor checks PID, start time, boot id and command line, so a reused PID is never
taken for a VM), and never boots a second VMM for a directory that has one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hypemand.hypervisor.base import Hypervisor, VMHandle

log = logging.getLogger(__name__)


class VMSupervisor:
    def __init__(self, hypervisor: Hypervisor, guests_dir: Path) -> None:
        self.hypervisor = hypervisor
        self.guests_dir = guests_dir
        self._handles: dict[str, VMHandle] = {}

    @property
    def adopted(self) -> dict[str, VMHandle]:
        return dict(self._handles)

    async def adopt_all(self) -> list[VMHandle]:
        """Re-attach to every VM that is still running; returns the adopted handles."""
        adopted: list[VMHandle] = []
        if not self.guests_dir.is_dir():
            return adopted
        for directory in sorted(p for p in self.guests_dir.iterdir() if p.is_dir()):
            handle = await self.hypervisor.adopt(directory)
            if handle is None:
                continue
            self._handles[handle.vm_id] = handle
            adopted.append(handle)
            log.info("adopted VM %s (pid %d) from %s", handle.vm_id, handle.pid, directory)
        return adopted

    def register(self, handle: VMHandle) -> None:
        self._handles[handle.vm_id] = handle

    async def close(self) -> None:
        """Release control connections. The VMs keep running."""
        for handle in self._handles.values():
            await handle.close()
        self._handles.clear()
