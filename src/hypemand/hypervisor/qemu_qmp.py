"""The QMP channel of one QEMU: a lazily (re)connected session on the VM's control socket.

QEMU's QMP socket serves one client at a time, so a handle keeps one session and reconnects only
after it broke. Timeouts and the mapping of failures to domain errors are the handle's job
(``qemu_vm.QemuVMHandle.qmp``); this module only keeps the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from hypemand.unixsock import connect_unix

PEER_GONE_ERRORS = ("ConnectionResetError", "BrokenPipeError")


def _peer_gone_is_end_of_file(record: logging.LogRecord) -> bool:
    """qemu.qmp logs a QEMU that closed its socket as ``end-of-file`` (INFO), but one that closed
    it with a command of ours still unread (a power button pressed again, a status read, the
    moment it exits) as a connection reset, or one we were writing to as a broken pipe, at ERROR.
    All are the VM's end, which the handle learns from the process itself: they are told at the
    level of the end-of-file."""
    if record.levelno == logging.ERROR and record.msg == "Task.%s: %s" and any(
        gone in str(record.args) for gone in PEER_GONE_ERRORS
    ):
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


PEER_GONE = _peer_gone_is_end_of_file


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
            if PEER_GONE not in client.logger.filters:
                client.logger.addFilter(PEER_GONE)
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
