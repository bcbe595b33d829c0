"""The TCP flows the kernel's connection tracking holds in the VM network's namespace, read
through pyroute2's conntrack (netlink) from a thread of its own in that namespace.

Connection tracking is per namespace: the flows to a VM's address (from the ingress proxy in the
namespace, or routed in through NAT) are in the table of the namespace that holds the bridge.
:class:`FlowReader` reads the flows each given VM address answers; what counts as activity is
the auto-standby policy's business (``hypemand.policies.activity``). Its thread is not
:class:`NetworkHost`'s: a read must never delay a TAP that a restore is waiting for.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from hypemand.network.namespace import NamespaceWorker

# linux/include/uapi/linux/netfilter/nf_conntrack_tcp.h
TCP_STATE_NONE = 0
TCP_STATE_SYN_SENT = 1
TCP_STATE_ESTABLISHED = 3
TCP_STATE_TIME_WAIT = 7
TCP_STATE_CLOSE = 8


@dataclass(frozen=True)
class TcpFlow:
    """One tracked TCP flow. ``client`` is the side that opened it (the original tuple's source,
    before any NAT); ``server`` and ``server_port`` are who answers it (the reply tuple's source,
    after any destination NAT), so a flow forwarded to a VM names the VM there even when the
    client dialled another address."""

    flow_id: int  # the kernel's id of the entry: a new entry is a new flow
    client: IPv4Address
    client_port: int
    dialled: IPv4Address  # the original destination
    dialled_port: int
    server: IPv4Address
    server_port: int
    state: int  # TCP_STATE_*
    mark: int = 0  # the entry's conntrack mark (firewall.SERVER_CONNECTION_MARK: the server's own)

    @property
    def key(self) -> tuple[int, IPv4Address, int, IPv4Address, int]:
        return (self.flow_id, self.client, self.client_port, self.dialled, self.dialled_port)


class FlowReader:
    """Reads TCP flows of the namespace (None: the server's own) from one thread there."""

    def __init__(self, namespace: str | None) -> None:
        self.namespace = namespace
        self._worker: NamespaceWorker | None = NamespaceWorker(namespace, label="conntrack")

    async def inbound_tcp_flows(self, servers: Collection[IPv4Address]) -> dict[IPv4Address, list[TcpFlow]]:
        """The IPv4 TCP flows each of ``servers`` answers (the reply comes from it), tracked now:
        one dump per address, filtered by the kernel, so the cost follows these flows and not
        the whole table (the VMs' own outbound connections, the host's). Raises OSError (or a
        netlink error) when the table cannot be read (no conntrack, no privileges, no
        namespace)."""
        if self._worker is None:
            raise RuntimeError("the flow reader is closed")
        return await self._worker.run(dump_inbound_tcp_flows, list(servers))

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


# What a read costs on this kind of host (bench/autostandby.py): every dump walks the whole hash
# table in the kernel (~10 ms with 262144 buckets, however few entries match), and pyroute2 takes
# ~0.1 ms to receive each entry it is given. Kernel-filtered dumps, one per address, cost the
# walk each; one dump of every TCP entry costs one walk and every entry of the table.
WALK_SECONDS = 0.010
ENTRY_SECONDS = 0.0001


def one_dump_is_cheaper(addresses: int, entries: int) -> bool:
    return WALK_SECONDS + entries * ENTRY_SECONDS < addresses * WALK_SECONDS


def dump_inbound_tcp_flows(servers: list[IPv4Address]) -> dict[IPv4Address, list[TcpFlow]]:
    """Blocking, in the namespace's thread: see :meth:`FlowReader.inbound_tcp_flows`."""
    return asyncio.run(_dump(servers))


async def _dump(servers: list[IPv4Address]) -> dict[IPv4Address, list[TcpFlow]]:
    # pyroute2's asynchronous socket, its messages decoded only for the attributes used here:
    # its ConntrackEntry decodes every attribute and checks the filter again, and its
    # synchronous API runs an event loop per message (together ~3x the cost per flow).
    from pyroute2.conntrack import AsyncConntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    found: dict[IPv4Address, list[TcpFlow]] = {server: [] for server in servers}
    conntrack = AsyncConntrack()
    try:
        await conntrack.setup_endpoint()
        if len(servers) > 1 and one_dump_is_cheaper(len(servers), int(await conntrack.count() or 0)):
            tcp = NFCTAttrTuple(family=socket.AF_INET, proto=socket.IPPROTO_TCP)
            async for message in await conntrack.dump(tuple_orig=tcp):
                answered_by = _reply_source(message)
                if answered_by in found and (flow := _flow(message)) is not None:
                    found[answered_by].append(flow)
            return found
        for server in servers:
            answered = NFCTAttrTuple(family=socket.AF_INET, saddr=str(server), proto=socket.IPPROTO_TCP)
            async for message in await conntrack.dump(tuple_reply=answered):
                flow = _flow(message)
                if flow is not None and flow.server == server:  # a kernel without the filter: checked
                    found[server].append(flow)
    finally:
        conntrack.close()
    return found


def _reply_source(message: Any) -> IPv4Address | None:
    """Who answers the flow: decoded alone first, so entries of no interest cost little."""
    reply = message.get_attr("CTA_TUPLE_REPLY")
    address = reply.get_attr("CTA_TUPLE_IP") if reply is not None else None
    source = address.get_attr("CTA_IP_V4_SRC") if address is not None else None
    return IPv4Address(source) if source else None


def _flow(message: Any) -> TcpFlow | None:
    original, reply = message.get_attr("CTA_TUPLE_ORIG"), message.get_attr("CTA_TUPLE_REPLY")
    if original is None or reply is None:
        return None
    original_ip, original_ports = original.get_attr("CTA_TUPLE_IP"), original.get_attr("CTA_TUPLE_PROTO")
    reply_ip, reply_ports = reply.get_attr("CTA_TUPLE_IP"), reply.get_attr("CTA_TUPLE_PROTO")
    if original_ports.get_attr("CTA_PROTO_NUM") != socket.IPPROTO_TCP:
        return None
    info = message.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None
    return TcpFlow(
        flow_id=int(message.get_attr("CTA_ID") or 0),
        client=IPv4Address(original_ip.get_attr("CTA_IP_V4_SRC")),
        client_port=int(original_ports.get_attr("CTA_PROTO_SRC_PORT") or 0),
        dialled=IPv4Address(original_ip.get_attr("CTA_IP_V4_DST")),
        dialled_port=int(original_ports.get_attr("CTA_PROTO_DST_PORT") or 0),
        server=IPv4Address(reply_ip.get_attr("CTA_IP_V4_SRC")),
        server_port=int(reply_ports.get_attr("CTA_PROTO_SRC_PORT") or 0),
        state=int(state or TCP_STATE_NONE),
        mark=int(message.get_attr("CTA_MARK") or 0),
    )
