"""The DNS responder Caddy asks for instances' addresses, at request time.

Caddy's upstream for a rule is ``<instance name or id>.vm.hypemand.internal.``, looked up through
this responder only (``caddyconfig``): a UDP socket on 127.0.0.1 inside Caddy's network
namespace, created by a thread that joined the namespace and then served by the event loop. It
answers from :class:`InstanceDirectory`, in memory:

* ``A`` for an instance that has an address: that address (TTL 0: Caddy keeps it for its own
  ``refresh`` interval); for one in standby, also the address it keeps, once it has been asked
  to wake (``waker.py``: the answer never waits for the restore);
* no answer (NOERROR) for ``AAAA`` and other types of a known instance, and for one without an
  address (stopped);
* NXDOMAIN for anything else, also names outside the zone: nothing is forwarded anywhere.

Every answer is authoritative (AA): Go's resolver takes an empty non-authoritative answer for a
lame referral and asks again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Protocol, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from hypemand.network import InstanceAddress

log = logging.getLogger(__name__)

# Called with the id of an instance in standby that an A query asks for: start (or join) its wake.
Wake = Callable[[str], object]


class InstanceDirectory(Protocol):
    """Where instances are now. Implemented by the instance manager."""

    def find_address(self, ref: str) -> InstanceAddress | None:
        """The instance whose id or exact name is ``ref`` (no prefixes), or None. Sync and
        cheap: called on the event loop for every lookup Caddy makes."""
        ...


def answer(query_wire: bytes, zone: str, directory: InstanceDirectory,
           wake: Wake | None = None) -> bytes | None:
    """The response to one DNS message, or None for something that is not a query. ``wake``
    (None: instances in standby are not woken) is called for an ``A`` query of one in standby."""
    try:
        query = dns.message.from_wire(query_wire)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    question = query.question[0]
    found = _lookup(question.name, dns.name.from_text(zone), directory)
    if found is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif found.ip is not None and question.rdtype == dns.rdatatype.A \
            and question.rdclass == dns.rdataclass.IN:
        if found.asleep and wake is not None:
            wake(found.id)
        response.answer.append(dns.rrset.from_text(question.name, 0, "IN", "A", found.ip))
    return response.to_wire()


def _lookup(name: dns.name.Name, zone: dns.name.Name, directory: InstanceDirectory) -> InstanceAddress | None:
    if not name.is_subdomain(zone) or len(name) != len(zone) + 1:
        return None
    label = name.labels[0].decode("ascii", errors="replace").lower()
    return directory.find_address(label)


def bind_udp(host: str, port: int) -> socket.socket:
    """The responder's socket. Blocking; run it in a thread that joined the namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: str, directory: InstanceDirectory, wake: Wake | None) -> None:
        self.zone = zone
        self.directory = directory
        self.wake = wake
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = answer(data, self.zone, self.directory, self.wake)
        except Exception:  # a lookup that fails must not end the responder
            log.exception("ingress DNS: answering a query failed")
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsResponder:
    """Serves :func:`answer` on a socket made elsewhere (in Caddy's namespace)."""

    def __init__(self, zone: str, directory: InstanceDirectory, wake: Wake | None = None) -> None:
        self.zone = zone
        self.directory = directory
        self.wake = wake
        self._transport: asyncio.DatagramTransport | None = None

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self.zone, self.directory, self.wake), sock=sock)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
