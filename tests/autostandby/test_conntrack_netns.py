"""``FlowReader`` against a real conntrack table: a network namespace of the test's own, entries
put in through ctnetlink (pyroute2), read back per VM address by both ways of reading (one
kernel-filtered dump per address; one dump of every TCP entry), which must agree: flows a VM
answers (dialled directly or through a destination NAT) are its own, its outbound ones and UDP
are not."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from hypemand.network import conntrack
from hypemand.network.conntrack import TCP_STATE_ESTABLISHED, TCP_STATE_TIME_WAIT, FlowReader, TcpFlow
from hypemand.network.namespace import ensure_namespace, run_in_namespace
from tests.network.lab import netns_supported

pytestmark = pytest.mark.netns

VM, OTHER = IPv4Address("10.100.0.5"), IPv4Address("10.100.0.6")
GATEWAY, REMOTE, UPLINK = "10.100.0.1", "198.51.100.1", "198.51.100.2"


@pytest.fixture
def namespace() -> Iterator[str]:
    if (why := netns_supported()) is not None:
        pytest.skip(why)
    name = f"hmtest-{secrets.token_hex(3)}-ct"
    ensure_namespace(name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def add_entries(namespace: str) -> None:
    def add() -> None:
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        def tcp(state: int) -> dict[str, object]:
            return {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [["CTA_PROTOINFO_TCP_STATE", state]]}]]}

        def entry(proto: int, orig: tuple[str, int, str, int], reply: tuple[str, int, str, int],
                  state: int | None = None) -> None:
            original = NFCTAttrTuple(saddr=orig[0], sport=orig[1], daddr=orig[2], dport=orig[3],
                                     proto=proto)
            answer = NFCTAttrTuple(saddr=reply[0], sport=reply[1], daddr=reply[2], dport=reply[3],
                                   proto=proto)
            extra = {"protoinfo": tcp(state)} if state is not None else {}
            table.entry("add", timeout=300, tuple_orig=original, tuple_reply=answer, **extra)

        with Conntrack() as table:
            # The ingress proxy in the namespace -> the VM's port 80.
            entry(6, (GATEWAY, 40001, str(VM), 80), (str(VM), 80, GATEWAY, 40001), TCP_STATE_ESTABLISHED)
            # From the world to the uplink's port 18080, sent to the VM's 7000 by a destination NAT.
            entry(6, (REMOTE, 40002, UPLINK, 18080), (str(VM), 7000, REMOTE, 40002), TCP_STATE_ESTABLISHED)
            # The VM's own connection out, masqueraded: not inbound.
            entry(6, (str(VM), 40003, REMOTE, 443), (REMOTE, 443, UPLINK, 40003), TCP_STATE_ESTABLISHED)
            # UDP to the VM: not TCP.
            entry(17, (GATEWAY, 40004, str(VM), 53), (str(VM), 53, GATEWAY, 40004))
            # A finished request to the other VM.
            entry(6, (GATEWAY, 40005, str(OTHER), 80), (str(OTHER), 80, GATEWAY, 40005), TCP_STATE_TIME_WAIT)

    run_in_namespace(namespace, add)


def summary(flows: list[TcpFlow]) -> list[tuple[str, int, str, int, str, int, int]]:
    return sorted((str(f.client), f.client_port, str(f.dialled), f.dialled_port, str(f.server), f.server_port,
                   f.state) for f in flows)


async def test_both_ways_of_reading_find_the_flows_each_vm_answers(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_entries(namespace)
    reader = FlowReader(namespace)
    try:
        per_address = await reader.inbound_tcp_flows([VM, OTHER, IPv4Address("10.100.0.7")])
        monkeypatch.setattr(conntrack, "one_dump_is_cheaper", lambda addresses, entries: True)
        one_dump = await reader.inbound_tcp_flows([VM, OTHER, IPv4Address("10.100.0.7")])
    finally:
        reader.close()
    assert summary(per_address[VM]) == [
        (GATEWAY, 40001, str(VM), 80, str(VM), 80, TCP_STATE_ESTABLISHED),
        (REMOTE, 40002, UPLINK, 18080, str(VM), 7000, TCP_STATE_ESTABLISHED),
    ]
    assert summary(per_address[OTHER]) == [
        (GATEWAY, 40005, str(OTHER), 80, str(OTHER), 80, TCP_STATE_TIME_WAIT)]
    assert per_address[IPv4Address("10.100.0.7")] == []
    assert all(flow.flow_id for flows in per_address.values() for flow in flows)
    assert {k: summary(v) for k, v in one_dump.items()} == {k: summary(v) for k, v in per_address.items()}


async def test_a_namespace_that_is_gone_is_an_error_not_an_empty_table() -> None:
    reader = FlowReader(f"hmtest-{secrets.token_hex(3)}-missing")
    try:
        with pytest.raises(Exception, match="namespace"):
            await reader.inbound_tcp_flows([VM])
    finally:
        reader.close()
