"""IDENTITY's network part: the wire format, and the real agent re-addressing an ``eth0``.

The agent runs on the host (host mode, see ``hostmode.py``) but inside a network namespace this
test makes, where ``eth0`` is one end of a veth pair whose other end (the "gateway") lives in a
second namespace: whatever the agent changes, it changes there, never on the host. No hostname
is ever sent (the UTS namespace is the host's). The same request in a real VM, behind a TAP, is
in ``tests/hypervisor/test_tap_network.py``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from hypemand.cbuild import compile_static, find_compiler
from hypemand.guest import protocol as p
from hypemand.guest.build import GuestBuildError
from hypemand.guest.client import AgentClient, AgentError
from hypemand.guest.config_disk import GuestNetwork
from tests.guest.hostmode import HostAgent
from tests.network.lab import Lab, ip, lab, netns_supported

OLD_MAC = "02:00:00:aa:00:05"
NEW_MAC = "02:00:00:bb:00:07"


# ---- the wire ---------------------------------------------------------------------------------


def test_a_request_without_a_network_is_the_old_request() -> None:
    """Agents that predate the network part read exactly what they always did."""
    entropy = bytes(range(16))
    raw = p.identity_request(4, entropy, p.parse_mac(NEW_MAC), "fork-1")
    mac_bytes = bytes.fromhex("020000bb0007")
    assert raw[p.HEADER.size :] == b"\x00\x10" + entropy + b"\x06" + mac_bytes + b"fork-1\0"


def test_the_network_part_follows_the_hostname() -> None:
    network = p.IdentityNetwork(IPv4Address("10.100.3.4"), 16, IPv4Address("10.100.0.1"))
    body = p.identity_request(1, b"", network=network)[p.HEADER.size :]
    assert body == b"\x00\x00" + b"\x00" + b"\0" + b"\x09" + bytes([10, 100, 3, 4, 16, 10, 100, 0, 1])
    no_gateway = p.identity_request(1, b"", network=p.IdentityNetwork(IPv4Address("10.0.0.2"), 8))
    assert no_gateway.endswith(bytes([9, 10, 0, 0, 2, 8, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        p.identity_request(1, b"", network=p.IdentityNetwork(IPv4Address("10.0.0.2"), 300))


def test_the_ok_says_whether_the_address_was_replaced() -> None:
    assert p.identity_replaced_network(b"\x01")
    assert not p.identity_replaced_network(b"\x00")
    assert not p.identity_replaced_network(b"")  # an agent older than the network part


def test_c_header_agrees_on_the_network_part() -> None:
    header = (Path(p.__file__).parent / "init" / "agent_proto.h").read_text()
    defines = dict(re.findall(r"^#define (AP_\w+) (\w+)", header, re.MULTILINE))
    assert int(defines["AP_IDENTITY_NET_LEN"]) == p.IDENTITY_NET_LEN
    assert int(defines["AP_IDENTITY_DONE_NETWORK"], 0) == p.IDENTITY_DONE_NETWORK


# ---- the agent, in a namespace of its own ------------------------------------------------------

_why_not = netns_supported()
in_netns = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


class NamespacedAgent(HostAgent):
    """The host-mode agent started inside a network namespace (``ip netns exec`` execs it, so
    the process is the agent itself, and /sys shows the namespace's devices)."""

    def __init__(self, binary: Path, socket_path: Path, namespace: str) -> None:
        super().__init__(binary, socket_path)
        self.namespace = namespace

    async def start(self, sock: socket.socket | None = None) -> None:
        await self.chardev.start()
        self.process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.namespace, str(self.binary), "agent", self.chardev.slave_path,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def ip_json(namespace: str, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(["ip", "-j", "-n", namespace, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout or "[]")  # type: ignore[no-any-return]


def addresses_of(namespace: str, device: str) -> list[str]:
    links = ip_json(namespace, "-4", "addr", "show", "dev", device)
    return [f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"]]  # type: ignore[attr-defined]


def addresses(namespace: str) -> list[str]:
    return addresses_of(namespace, "eth0")


def routes(namespace: str) -> list[str]:
    table = ip_json(namespace, "-4", "route", "show", "dev", "eth0")
    return [f"{r['dst']} via {r.get('gateway', '-')}" for r in table]


def neighbours(namespace: str) -> list[str]:
    return [str(n["dst"]) for n in ip_json(namespace, "-4", "neigh", "show", "dev", "eth0")]


def mac(namespace: str) -> str:
    return str(ip_json(namespace, "link", "show", "dev", "eth0")[0]["address"])


def state(namespace: str) -> tuple[list[str], list[str], list[str], str]:
    return addresses(namespace), routes(namespace), neighbours(namespace), mac(namespace)


@pytest.fixture
def guest_ns() -> Iterator[tuple[Lab, str]]:
    """``<p>-guest`` with eth0 (a veth) holding two addresses of 10.77.0.0/24, one of another
    subnet, a default route and three neighbours; its peer ``gw0`` in ``<p>-gw`` is 10.77.0.1 and
    10.88.0.1/16 (the gateway before and after)."""
    with lab() as own:
        guest, gw = own.add_namespace("guest"), own.add_namespace("gw")
        ip("-n", guest, "link", "add", "eth0", "address", OLD_MAC, "type", "veth", "peer", "name", "gw0",
           "netns", gw)
        ip("-n", gw, "addr", "add", "10.77.0.1/24", "dev", "gw0")
        ip("-n", gw, "addr", "add", "10.88.0.1/16", "dev", "gw0")
        ip("-n", gw, "link", "set", "gw0", "up")
        for address in ("10.77.0.5/24", "10.77.0.6/24", "192.168.50.5/24"):
            ip("-n", guest, "addr", "add", address, "dev", "eth0")
        ip("-n", guest, "link", "set", "eth0", "up")
        ip("-n", guest, "route", "add", "default", "via", "10.77.0.1")
        for n, nud in (("10.77.0.9", "permanent"), ("10.77.0.10", "stale"), ("192.168.50.9", "reachable")):
            ip("-n", guest, "neigh", "add", n, "lladdr", f"02:00:00:00:00:{n[-2:].strip('.')}", "dev", "eth0",
               "nud", nud)
        yield own, guest


@pytest.fixture
async def ns_agent(
    guest_binary: Path, tmp_path: Path, guest_ns: tuple[Lab, str]
) -> AsyncIterator[AgentClient]:
    agent = NamespacedAgent(guest_binary, tmp_path / "agent.sock", guest_ns[1])
    await agent.start()
    try:
        client = await AgentClient.connect(agent.socket_path, timeout=30)
        try:
            yield client
        finally:
            await client.close()
    finally:
        await agent.stop()


@pytest.mark.netns
@in_netns
@pytest.mark.parametrize("with_mac", [True, False])
async def test_the_address_is_replaced_not_added(
    ns_agent: AgentClient, guest_ns: tuple[Lab, str], with_mac: bool
) -> None:
    _, guest = guest_ns
    assert sorted(addresses(guest)) == ["10.77.0.5/24", "10.77.0.6/24", "192.168.50.5/24"]
    new = GuestNetwork(ip="10.88.3.7", prefix=16, gateway="10.88.0.1")
    await ns_agent.set_identity(os.urandom(32), mac=NEW_MAC if with_mac else None, network=new)
    assert addresses(guest) == ["10.88.3.7/16"]  # every old one gone, secondaries included
    assert routes(guest) == ["default via 10.88.0.1", "10.88.0.0/16 via -"]
    assert "10.77.0.9" not in neighbours(guest) and "192.168.50.9" not in neighbours(guest)
    assert "10.77.0.10" not in neighbours(guest)
    assert mac(guest) == (NEW_MAC if with_mac else OLD_MAC)
    # The gateway answers the new address at once.
    ping = await asyncio.to_thread(
        subprocess.run, ["ip", "netns", "exec", guest, "busybox", "ping", "-c", "1", "-W", "5", "10.88.0.1"],
        capture_output=True, text=True,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # Again with the same address: nothing to change, and no error.
    await ns_agent.set_identity(b"", network=new)
    assert addresses(guest) == ["10.88.3.7/16"] and routes(guest)[0] == "default via 10.88.0.1"
    # Without a gateway: no default route at all.
    await ns_agent.set_identity(b"", network=GuestNetwork(ip="10.88.3.8", prefix=16))
    assert addresses(guest) == ["10.88.3.8/16"] and routes(guest) == ["10.88.0.0/16 via -"]


BAD_NETWORKS = [
    (GuestNetwork(ip="10.88.3.7", prefix=0, gateway=None), "prefix /0"),
    (GuestNetwork(ip="10.88.0.0", prefix=16, gateway="10.88.0.1"), "not a host address"),  # network
    (GuestNetwork(ip="10.88.255.255", prefix=16, gateway="10.88.0.1"), "not a host address"),  # broadcast
    (GuestNetwork(ip="127.0.0.2", prefix=8, gateway=None), "not a host address"),
    (GuestNetwork(ip="0.1.2.3", prefix=8, gateway=None), "not a host address"),
    (GuestNetwork(ip="224.0.0.5", prefix=24, gateway=None), "not a host address"),
    (GuestNetwork(ip="255.255.255.255", prefix=32, gateway=None), "not a host address"),
    (GuestNetwork(ip="10.88.3.7", prefix=16, gateway="10.89.0.1"), "not another host"),  # outside
    (GuestNetwork(ip="10.88.3.7", prefix=16, gateway="10.88.3.7"), "not another host"),  # itself
    (GuestNetwork(ip="10.88.3.7", prefix=16, gateway="10.88.255.255"), "not another host"),
    (GuestNetwork(ip="10.88.3.7", prefix=32, gateway="10.88.0.1"), "not another host"),
]


@pytest.mark.netns
@in_netns
async def test_a_bad_network_is_refused_before_anything_changes(
    ns_agent: AgentClient, guest_ns: tuple[Lab, str]
) -> None:
    _, guest = guest_ns
    before = state(guest)
    for network, message in BAD_NETWORKS:
        with pytest.raises(AgentError) as info:
            await ns_agent.set_identity(os.urandom(16), mac=NEW_MAC, network=network)
        assert info.value.errno == errno.EINVAL and message in str(info.value), (network, info.value)
    # A network part of another length is malformed: refused the same way.
    short = p.identity_request(1, b"", p.parse_mac(NEW_MAC))[p.HEADER.size :] + b"\x05" + bytes(5)
    with pytest.raises(AgentError) as info:
        await ns_agent._simple(lambda sid: p.encode_frame(sid, p.Msg.IDENTITY, short), p.Msg.OK)
    assert info.value.errno == errno.EINVAL and "a network has 9 bytes" in str(info.value)
    assert state(guest) == before  # not even the MAC, which comes before the network
    # Without a network the request is today's, and the OK says the address was not replaced.
    frame = await ns_agent._simple(
        lambda sid: p.identity_request(sid, os.urandom(16)), p.Msg.OK
    )
    assert frame.payload == b"\x00"


@pytest.mark.netns
@in_netns
async def test_without_eth0_nothing_changes(ns_agent: AgentClient, guest_ns: tuple[Lab, str]) -> None:
    _, guest = guest_ns
    ip("-n", guest, "link", "set", "eth0", "down")
    ip("-n", guest, "link", "set", "eth0", "name", "eth9")
    before = addresses_of(guest, "eth9")
    with pytest.raises(AgentError) as info:
        network = GuestNetwork(ip="10.88.3.7", prefix=16)
        await ns_agent.set_identity(os.urandom(16), mac=NEW_MAC, network=network)
    assert info.value.errno == errno.ENODEV and "no eth0" in str(info.value)
    assert addresses_of(guest, "eth9") == before


# The last commit whose agent has no network part: what runs in the memory of snapshots taken
# before it. Its binary is built from that commit's sources.
OLD_AGENT_COMMIT = "a2bcac7"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def old_guest_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    init = "src/hypemand/guest/init"
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{OLD_AGENT_COMMIT}:{init}"],
                             capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"commit {OLD_AGENT_COMMIT} is not in this checkout: {listing.stderr.strip()}")
    sources = tmp_path_factory.mktemp("old-agent-src")
    for name in listing.stdout.split():
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_AGENT_COMMIT}:{init}/{name}"],
                              capture_output=True, check=True).stdout
        (sources / name).write_bytes(blob)
    target = tmp_path_factory.mktemp("old-agent") / "hypeman-init"
    compile_static(find_compiler(), sorted(sources.iterdir()), target, GuestBuildError, "the old agent")
    return target


@pytest.mark.netns
@in_netns
async def test_an_agent_older_than_the_network_part_is_told_apart(
    old_guest_binary: Path, tmp_path: Path, guest_ns: tuple[Lab, str]
) -> None:
    """It ignores the network part and answers an empty OK: the host raises ENOTSUP rather than
    report a fork that still has its source's address. Requests without one work as ever."""
    _, guest = guest_ns
    before = state(guest)
    agent = NamespacedAgent(old_guest_binary, tmp_path / "agent.sock", guest)
    await agent.start()
    try:
        client = await AgentClient.connect(agent.socket_path, timeout=30)
        try:
            await client.set_identity(os.urandom(16))
            with pytest.raises(AgentError) as info:
                await client.set_identity(os.urandom(16), network=GuestNetwork(ip="10.88.3.7", prefix=16))
            assert info.value.errno == errno.ENOTSUP and "predates" in str(info.value)
        finally:
            await client.close()
    finally:
        await agent.stop()
    assert state(guest) == before
