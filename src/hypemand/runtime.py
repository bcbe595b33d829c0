"""The server's domain services, wired together once at start-up.

The HTTP layer holds one :class:`Runtime` and calls into it; nothing here knows about HTTP.
Domains add their service here: build it in ``__init__``, start it in :meth:`start`,
stop it in :meth:`stop`.
"""

from __future__ import annotations

import logging

from hypemand.auth import load_secret
from hypemand.config import Settings
from hypemand.images.service import ImageService

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.jwt_secret = load_secret(settings.data_dir)
        self.images = ImageService(settings.data_dir)

    async def start(self) -> None:
        log.info("hypemand starting with data dir %s", self.settings.data_dir)
        await self.images.start()

    async def stop(self) -> None:
        """Stop the server's own work. VMs are never stopped here: they outlive the server."""
        await self.images.stop()
