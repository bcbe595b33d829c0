"""The server's domain services, wired together once at start-up.

The HTTP layer holds one :class:`Runtime` and calls into it; nothing here knows about HTTP.
Domains add their service here: build it in ``__init__``, start it in :meth:`start`,
stop it in :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import logging

from hypemand.auth import load_secret
from hypemand.config import Settings
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.images.service import ImageService
from hypemand.instances.supervisor import VMSupervisor
from hypemand.system.files import SystemFiles, ensure_system_files

log = logging.getLogger(__name__)


def check_host(settings: Settings) -> SystemFiles:
    """What the server needs before it can boot anything: QEMU and the system files.

    Raises a DomainError (DependencyMissing names the package to install) instead of letting a
    missing tool surface later as a stack trace in the middle of a request.
    """
    QemuHypervisor().version()
    return ensure_system_files(settings.system_dir)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The data dir holds the token secret and private images' disks: only the server reads it.
        settings.data_dir.chmod(0o700)
        self.jwt_secret = load_secret(settings.data_dir)
        self.images = ImageService(settings.data_dir)
        self.hypervisor = QemuHypervisor(state_dir=settings.data_dir / "hypervisor")
        self.vms = VMSupervisor(self.hypervisor, settings.data_dir / "guests")
        self.system: SystemFiles | None = None

    async def start(self) -> None:
        log.info("hypemand starting with data dir %s", self.settings.data_dir)
        # Startup order: system files, then the VMs that outlived the last server, then queues.
        self.system = await asyncio.to_thread(ensure_system_files, self.settings.system_dir)
        log.info("guest kernel %s, initrd %s", self.system.kernel_version, self.system.initrd_version)
        await self.vms.adopt_all()
        await self.images.start()

    async def stop(self) -> None:
        """Stop the server's own work. VMs are never stopped here: they outlive the server."""
        await self.images.stop()
        await self.vms.close()
