"""The TCP flows the kernel's connection tracking holds in the VM network's namespace, read
through pyroute2's conntrack (netlink) from a thread of its own in that namespace.

Connection tracking is per namespace: the flows to a VM's address (from the ingress proxy in the
namespace, or routed in through NAT) are in the table of the namespace that holds the bridge.
:class:`FlowReader` dumps that table; what counts as activity is the auto-standby policy's
business (``hypemand.policies.activity``). Its thread is not :class:`NetworkHost`'s: a dump of a
large table must never delay a TAP that a restore is waiting for.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

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

    @property
    def key(self) -> tuple[int, IPv4Address, int, IPv4Address, int]:
        return (self.flow_id, self.client, self.client_port, self.dialled, self.dialled_port)


class FlowReader:
    """Dumps the TCP flows of the namespace (None: the server's own) from one thread there."""

    def __init__(self, namespace: str | None) -> None:
        self.namespace = namespace
        self._worker: NamespaceWorker | None = NamespaceWorker(namespace, label="conntrack")

    async def tcp_flows(self) -> list[TcpFlow]:
        """Every IPv4 TCP flow tracked now. Raises OSError (or a netlink error) when the table
        cannot be read (no conntrack module, no privileges, the namespace is gone)."""
        if self._worker is None:
            raise RuntimeError("the flow reader is closed")
        return await self._worker.run(dump_tcp_flows)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def dump_tcp_flows() -> list[TcpFlow]:
    """Blocking, in the namespace's thread: the IPv4 TCP entries of conntrack (filtered by the
    kernel where it can, by pyroute2 where not)."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    flows: list[TcpFlow] = []
    with Conntrack() as conntrack:
        tcp_only = NFCTAttrTuple(family=socket.AF_INET, proto=socket.IPPROTO_TCP)
        for entry in conntrack.dump_entries(tuple_orig=tcp_only):
            original, reply = entry.tuple_orig, entry.tuple_reply
            if original.proto != socket.IPPROTO_TCP or entry.protoinfo is None:
                continue
            flows.append(TcpFlow(
                flow_id=int(entry.id or 0),
                client=IPv4Address(original.saddr),
                client_port=int(original.sport or 0),
                dialled=IPv4Address(original.daddr),
                dialled_port=int(original.dport or 0),
                server=IPv4Address(reply.saddr),
                server_port=int(reply.sport or 0),
                state=int(entry.protoinfo.state or TCP_STATE_NONE),
            ))
    return flows
