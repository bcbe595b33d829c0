"""Caddy's admin API over its Unix socket, from asyncio.

The socket lives in the data directory, whose path may be longer than a socket address allows,
so it is reached through :func:`hypemand.unixsock.open_unix_connection`. Caddy accepts a request
on a Unix socket only with an *empty* Host header (it checks the Host against the allowed
origins, and a Unix socket's only origin is ""), which HTTP client libraries will not send; so
this is a small HTTP/1.1 client of its own, on h11, one connection per request.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11

from hypemand.unixsock import open_unix_connection

REQUEST_TIMEOUT = 30.0  # a load waits for the old servers to close (their grace period) and the new to bind
_READ_CHUNK = 65536


class AdminUnavailable(RuntimeError):
    """Caddy's admin socket does not answer (Caddy is not running, or not yet listening)."""


@dataclass(frozen=True)
class AdminResponse:
    status: int
    body: bytes

    def error(self) -> str:
        """Caddy's reason for a refusal (its ``{"error": ...}``), or the body as text."""
        try:
            data = json.loads(self.body)
        except ValueError:
            return self.body.decode(errors="replace").strip()
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])
        return self.body.decode(errors="replace").strip()


class CaddyAdmin:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def request(self, method: str, path: str, body: bytes = b"",
                      timeout: float = REQUEST_TIMEOUT) -> AdminResponse:  # noqa: ASYNC109
        try:
            return await asyncio.wait_for(self._exchange(method, path, body), timeout)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            raise AdminUnavailable(f"Caddy's admin API ({self.socket_path.name}) did not answer: "
                                   f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(self, method: str, path: str, body: bytes) -> AdminResponse:
        reader, writer = await open_unix_connection(self.socket_path)
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("Host", ""), ("Connection", "close"), ("Content-Length", str(len(body)))]
            if body:
                headers.append(("Content-Type", "application/json"))
            writer.write(conn.send(h11.Request(method=method, target=path, headers=headers)) or b"")
            if body:
                writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(_READ_CHUNK))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return AdminResponse(status, b"".join(chunks))
        finally:
            writer.close()

    async def load(self, config: dict[str, Any]) -> AdminResponse:
        """``POST /load``: Caddy runs the new config, or keeps the old one running and says why."""
        return await self.request("POST", "/load", json.dumps(config).encode())

    async def ping(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Whether the admin API answers at all."""
        try:
            await self.request("GET", "/config/", timeout=timeout)
        except AdminUnavailable:
            return False
        return True
