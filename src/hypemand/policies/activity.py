"""What counts as inbound activity for auto-standby, and the idle countdown of one instance.
Pure: no clock, no I/O (the controller in ``autostandby.py`` feeds both).

**Activity** (reference §3.11) is a tracked IPv4 TCP flow that the VM answers (it is the server
side: the reply comes from its address, so a client that dialled it directly or through a
destination NAT both count), in a live state, whose client is not in ``ignore_source_cidrs``
and whose VM port is not in ``ignore_destination_ports``. Live is every state but NONE,
TIME_WAIT and CLOSE: a connection still being opened (SYN_SENT) is a client waiting, and a state
this module does not know is taken as live (a live flow misjudged as finished would put a VM in
standby under a client; the other mistake costs a little idle time).

The table is read by polling, so a flow that opened and closed between two reads is seen only
as a finished entry (TIME_WAIT lasts two minutes, CLOSE ten seconds): a qualifying flow that was
not in the previous read is activity too, whatever its state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, ip_network

from hypemand.network.conntrack import TCP_STATE_CLOSE, TCP_STATE_NONE, TCP_STATE_TIME_WAIT, TcpFlow
from hypemand.network.firewall import SERVER_CONNECTION_MARK
from hypemand.policies.models import AutoStandbyMemory, AutoStandbyPolicy

FINISHED_STATES = frozenset({TCP_STATE_NONE, TCP_STATE_TIME_WAIT, TCP_STATE_CLOSE})

FlowKey = tuple[int, IPv4Address, int, IPv4Address, int]


def is_live(state: int) -> bool:
    return state not in FINISHED_STATES


@dataclass(frozen=True)
class InboundFilter:
    """Which flows keep one VM awake: its address, minus the policy's ignore lists."""

    address: IPv4Address
    ignored_sources: tuple[IPv4Network, ...] = ()
    ignored_ports: frozenset[int] = frozenset()

    @classmethod
    def of(cls, address: str, policy: AutoStandbyPolicy) -> InboundFilter:
        networks = tuple(n for n in (ip_network(c, strict=False) for c in policy.ignore_source_cidrs)
                         if isinstance(n, IPv4Network))
        return cls(IPv4Address(address), networks, frozenset(policy.ignore_destination_ports))

    def matches(self, flow: TcpFlow) -> bool:
        if flow.server != self.address or flow.server_port in self.ignored_ports:
            return False
        if flow.mark == SERVER_CONNECTION_MARK:
            return False  # the server's own (a health probe), not a client's
        return not any(flow.client in network for network in self.ignored_sources)

    def inbound(self, flows: Iterable[TcpFlow]) -> list[TcpFlow]:
        return [flow for flow in flows if self.matches(flow)]


@dataclass
class IdleCountdown:
    """One instance's countdown to standby. ``observe`` takes each read of the table; the
    timestamps are what the instance's record keeps (``AutoStandbyMemory``)."""

    idle_since: datetime | None = None
    last_activity: datetime | None = None
    hold_until: datetime | None = None
    active: int = 0  # live inbound flows in the last read
    seen: set[FlowKey] | None = field(default=None, repr=False)  # None: nothing read yet

    @classmethod
    def resumed(cls, memory: AutoStandbyMemory | None) -> IdleCountdown:
        """The countdown a record remembers (a server restart resumes it)."""
        if memory is None:
            return cls()
        return cls(memory.idle_since, memory.last_inbound_activity_at, memory.hold_until)

    def memory(self) -> AutoStandbyMemory:
        return AutoStandbyMemory(
            idle_since=self.idle_since, last_inbound_activity_at=self.last_activity,
            hold_until=self.hold_until,
        )

    def observe(self, inbound: list[TcpFlow], now: datetime) -> bool:
        """One read of the VM's inbound flows at ``now``. True when what the record keeps
        changed (the countdown started, or activity stopped it). The first read only seeds which
        flows are known: an old finished flow is not new activity, and an instance with live
        flows is active at once."""
        keys = {flow.key for flow in inbound}
        new = keys - self.seen if self.seen is not None else set()
        self.seen = keys
        was_active, idle_before = self.active, self.idle_since
        self.active = sum(1 for flow in inbound if is_live(flow.state))
        if self.active or new:
            self.last_activity = now
            # A flow that came and went between two reads: activity, then idle from now on.
            self.idle_since = None if self.active else now
        elif self.idle_since is None:
            self.idle_since = now
        # Not written again on every read while connections stay open.
        return self.idle_since != idle_before or bool(new and not (was_active and self.active))

    def next_standby_at(self, idle_timeout: timedelta) -> datetime | None:
        """When the countdown ends: ``idle_timeout`` after the instance went idle, or when a
        hold ends if that is later. None while it is active."""
        if self.active or self.idle_since is None:
            return None
        due = self.idle_since + idle_timeout
        if self.hold_until is not None and self.hold_until > due:
            return self.hold_until
        return due

    def due(self, idle_timeout: timedelta, now: datetime) -> bool:
        when = self.next_standby_at(idle_timeout)
        return when is not None and when <= now
