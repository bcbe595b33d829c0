"""The QMP channel of one QEMU: a lazily (re)connected session on the VM's control socket.

QEMU's QMP socket serves one client at a time, so a handle keeps one session and reconnects only
after it broke. Timeouts and the mapping of failures to domain errors are the handle's job
(``qemu_vm.QemuVMHandle.qmp``); this module only keeps the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from hypemand.unixsock import connect_unix


class QmpChannel:
    """One lazily (re)connected QMP session."""

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
