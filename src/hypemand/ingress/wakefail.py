"""A clear 502, at once, for requests to an instance whose wake just failed.

Caddy tries a failed dial again until ``caddyconfig.WAKE_WAIT`` is over, whatever else it learns
meanwhile (with no upstream left it keeps the dial error and keeps trying), and stops early only
on an error after a connection was made. So while an instance's wake is known to have failed,
TCP from the namespace to its address is redirected (the ingress's own nft table, nat output
hook) to a listener of ours on 127.0.0.1, which answers whatever request comes with 502 and why,
then closes; Caddy passes that answer on. The address leaves the set when the waker's pause after
the failure ends or the instance is restored otherwise, and the whole table goes when the
ingress stops (and is made anew when it starts: nothing stale survives a server's restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Any

import h11

from hypemand.network.firewall import FAMILY, run_nft
from hypemand.network.namespace import NamespaceWorker

log = logging.getLogger(__name__)

TABLE = "hypemand_ingress"
UNWOKEN = "unwoken"  # addresses of instances whose wake failed just now
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a redirected connection was going
READ_TIMEOUT = 5.0  # for the request's head; then the answer goes anyway
_CHUNK = 65536

Json = dict[str, Any]


_TO_UNWOKEN: Json = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                               "right": f"@{UNWOKEN}"}}
_TCP: Json = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}


def table_commands(port: int) -> Json:
    """The ingress's table, made anew in one transaction: the set, and TCP to its addresses
    redirected to ``port`` on the loopback before any filter sees it."""
    ref = {"family": FAMILY, "name": TABLE}
    return {"nftables": [
        {"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}},
        {"add": {"set": {"family": FAMILY, "table": TABLE, "name": UNWOKEN, "type": "ipv4_addr"}}},
        {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "redirect", "type": "nat",
                           "hook": "output", "prio": -100, "policy": "accept"}}},
        {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": "redirect",
                          "comment": "hypemand ingress: failed wakes answered by the server",
                          "expr": [_TO_UNWOKEN, _TCP, {"redirect": {"port": port}}]}}},
    ]}


def element_commands(address: str, unwoken: bool) -> Json:
    element = {"family": FAMILY, "table": TABLE, "name": UNWOKEN, "elem": [address]}
    change: list[Json] = [{"add": {"element": element}}]
    if not unwoken:
        change.append({"delete": {"element": element}})  # after the add: valid if absent
    return {"nftables": change}


def delete_commands() -> Json:
    ref = {"family": FAMILY, "name": TABLE}
    return {"nftables": [{"add": {"table": ref}}, {"delete": {"table": ref}}]}


def response_bytes(reason: str) -> bytes:
    body = reason.encode() + b"\n"
    head = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    return head + body


def _bind_loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _original_address(writer: asyncio.StreamWriter) -> str | None:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    return socket.inet_ntoa(struct.unpack_from("!2xH4s", raw)[1])


class WakeFailures:
    """The redirect and the listener behind it, in the ingress's namespace."""

    def __init__(self) -> None:
        self._worker: NamespaceWorker | None = None
        self._server: asyncio.Server | None = None
        self._reasons: dict[str, str] = {}  # address -> what to answer

    async def start(self, worker: NamespaceWorker) -> None:
        sock = await worker.run(_bind_loopback)
        self._server = await asyncio.start_server(self._answer, sock=sock)
        port = sock.getsockname()[1]
        await worker.run(run_nft, table_commands(port))
        self._worker = worker

    async def refuse(self, address: str, reason: str) -> None:
        """Answer requests for ``address`` with 502 and ``reason`` from now on."""
        self._reasons[address] = reason
        if self._worker is not None:
            await self._worker.run(run_nft, element_commands(address, True))

    async def admit(self, address: str) -> None:
        """Let requests for ``address`` through again."""
        if self._worker is not None:
            await self._worker.run(run_nft, element_commands(address, False))
        self._reasons.pop(address, None)

    async def close(self) -> None:
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker.run(run_nft, delete_commands())
            self._worker = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = _original_address(writer)
        reason = self._reasons.get(address or "", "the instance could not be woken")
        try:
            with contextlib.suppress(TimeoutError, h11.ProtocolError):
                await asyncio.wait_for(_read_head(reader), READ_TIMEOUT)
            writer.write(response_bytes(reason))
            await writer.drain()
        except OSError:
            pass  # Caddy gave up first
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> None:
    """Read up to the end of the request's head (what Caddy sent first), so that the answer is
    not taken for a reply to nothing."""
    parser = h11.Connection(h11.SERVER)
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_CHUNK)
            parser.receive_data(data)
            if not data:
                return
            continue
        if isinstance(event, (h11.Request, h11.ConnectionClosed)):
            return
