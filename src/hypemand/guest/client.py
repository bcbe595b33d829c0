"""Host side of the guest agent: ``AgentClient``, an asyncio client over the unix socket of
QEMU's chardev.

One connection carries many independent sessions (exec, file transfers, stat ...). A single reader
task parses frames and hands each to its session; every data direction is credit-based (see
``guest/README.md``), so a slow consumer stalls only its own session.

The client is put together from one module per job: ``connection.py`` (dial, handshake, frames
to sessions), ``session.py`` (one session's queue and credit; the errors), ``exec_session.py``
(processes) and ``transfer.py`` (files). The small requests (ping, clock, identity) live here.
Everything callers use is importable from this module.
"""

from __future__ import annotations

import errno
import secrets
import time
from ipaddress import IPv4Address

from hypemand.guest import protocol as p
from hypemand.guest.config_disk import GuestNetwork
from hypemand.guest.exec_session import ExecOperations, ExecSession
from hypemand.guest.session import AgentDisconnected, AgentError, AgentTimeout
from hypemand.guest.transfer import FileOperations, GetEntry, GetEntryError

__all__ = [
    "AgentClient",
    "AgentDisconnected",
    "AgentError",
    "AgentTimeout",
    "ExecSession",
    "GetEntry",
    "GetEntryError",
]


class AgentClient(ExecOperations, FileOperations):
    """Client of the guest agent behind ``socket_path`` (QEMU's chardev socket, server side)."""

    async def ping(self) -> float:
        """Round trip through the guest agent, in seconds."""
        token = secrets.randbits(63)
        start = time.perf_counter()
        frame = await self._simple(lambda sid: p.ping(sid, token), p.Msg.PONG)
        if p.decode_u64(frame.payload) != token:
            raise p.ProtocolError("PONG carries the wrong token")
        return time.perf_counter() - start

    async def set_clock(self, unix_ns: int | None = None) -> None:
        """Set the guest wall clock (default: the host's now), e.g. after a restore."""
        value = time.time_ns() if unix_ns is None else unix_ns
        await self._simple(lambda sid: p.set_clock_request(sid, value), p.Msg.OK)

    async def set_identity(
        self,
        entropy: bytes,
        mac: str | None = None,
        hostname: str | None = None,
        network: GuestNetwork | None = None,
    ) -> None:
        """Give a guest resumed from a shared memory image its own identity: ``entropy`` (the
        caller's ``os.urandom(64)``; at most 512 bytes) is mixed into the kernel's pool, credited,
        and the CRNG reseeded at once; ``mac`` (``"52:54:00:…"``) becomes eth0's address (without
        ``network`` its IPv4 address and routes are kept); ``hostname`` is set; ``network``
        (its ip, prefix and gateway; ``dns`` is not touched) replaces eth0's IPv4 address, its
        default route goes via the gateway, and the neighbour cache is flushed. ``None`` or empty
        keeps the current value. Everything is checked before anything changes (EINVAL: a
        network address that is not a host of its subnet, a gateway outside it); then a failing
        step raises ``AgentError`` with the guest's errno, and the steps before it (entropy,
        hostname, MAC, network, in that order) stay done. An agent that predates the network
        part (a snapshot made by an older hypemand) raises ``AgentError`` (ENOTSUP) after doing
        the rest."""
        raw_mac = p.parse_mac(mac) if mac else b""
        address = None
        if network is not None:
            gateway = IPv4Address(network.gateway) if network.gateway else None
            address = p.IdentityNetwork(IPv4Address(network.ip), network.prefix, gateway)
        frame = await self._simple(
            lambda sid: p.identity_request(sid, entropy, raw_mac, hostname or "", address), p.Msg.OK
        )
        if address is not None and not p.identity_replaced_network(frame.payload):
            raise AgentError(
                "the guest agent predates re-addressing (a snapshot of an older hypemand): its "
                "identity changed but its address did not",
                errno.ENOTSUP,
            )
