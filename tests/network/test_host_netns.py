"""NetworkHost in network namespaces this test makes (see lab.py): NAT to "the internet",
VMs isolated from each other, reconcile and adoption, bandwidth limits.

Each test builds its own lab and removes it, also on failure. Traffic goes only to addresses
inside the lab's namespaces.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address

import pytest

from hypemand.network import BandwidthLimits, NetworkConfig, NetworkConfigError, NetworkHost, TapError
from hypemand.network.firewall import current_rules
from hypemand.network.namespace import run_in_namespace
from tests.network.lab import INTERNET_ADDRESS, Lab, ip, lab, netns_supported, root_links, tool

_why_not = netns_supported()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

SUBNET = "10.213.0.0/24"
VM1, VM2 = "aaaaaaaa0000000000000001", "bbbbbbbb0000000000000002"
IP1, IP2 = IPv4Address("10.213.0.11"), IPv4Address("10.213.0.12")
PREFIX = 24


@pytest.fixture
def net_lab() -> Iterator[Lab]:
    before = root_links()
    with lab() as own:
        own.build_internet()
        yield own
    after = root_links()
    assert "vmbr" not in after and "hype-" not in after, "a device appeared in the root namespace"
    assert after.count("\n") == before.count("\n")


@pytest.fixture
async def host(net_lab: Lab) -> AsyncIterator[NetworkHost]:
    own = NetworkHost(NetworkConfig.parse(subnet=SUBNET, namespace=net_lab.srv))
    try:
        await own.start(set())
        yield own
    finally:
        own.close()


async def plug(net_lab: Lab, host: NetworkHost, role: str, vm_id: str, ip: IPv4Address,
               limits: BandwidthLimits | None = None) -> str:
    await host.create_tap(vm_id, ip, limits)
    fd = await host.open_tap(vm_id, vnet_hdr=False)
    return net_lab.plug_vm(role, fd, ip, PREFIX, host.config.gateway)


def started(net_lab: Lab, namespace: str, *args: str) -> None:
    process = net_lab.start(namespace, *args)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line == "ready", f"traffic.py {args[0]} did not start: {line!r} {process.stderr}"


def links(namespace: str) -> str:
    return subprocess.run(["ip", "-n", namespace, "-o", "link"], capture_output=True, text=True,
                          check=True).stdout


async def test_a_vm_fetches_a_page_from_the_internet_through_nat(net_lab: Lab, host: NetworkHost) -> None:
    vm = await plug(net_lab, host, "vm1", VM1, IP1)
    started(net_lab, net_lab.net, "serve-http", INTERNET_ADDRESS, "8080")
    assert net_lab.run(vm, "fetch", f"http://{INTERNET_ADDRESS}:8080/") == "hello from the internet"
    # Nothing from the internet reaches a VM uninvited (no route is even needed to try: the
    # internet namespace routes the subnet to the server's uplink for this check).
    started(net_lab, vm, "listen", str(IP1), "7000")
    ip("-n", net_lab.net, "route", "add", SUBNET, "via", "198.51.100.2")
    assert net_lab.run(net_lab.net, "connect", str(IP1), "7000", "2") == "timeout"
    # The server's own namespace reaches the VM (what the ingress proxy will do).
    assert net_lab.run(net_lab.srv, "connect", str(IP1), "7000", "5") == "connected"
    # Released: the address's tracked connections go, so its next owner inherits none.
    assert await host.forget_connections(IP1) >= 2
    assert await host.forget_connections(IP1) == 0


async def test_two_vms_cannot_reach_each_other(net_lab: Lab, host: NetworkHost) -> None:
    vm1 = await plug(net_lab, host, "vm1", VM1, IP1)
    vm2 = await plug(net_lab, host, "vm2", VM2, IP2)
    started(net_lab, vm2, "listen", str(IP2), "7000")
    assert net_lab.run(net_lab.srv, "connect", str(IP2), "7000", "5") == "connected"
    # Layer 2: the same subnet, so VM1 asks for VM2's MAC directly; isolated ports drop it.
    assert net_lab.run(vm1, "connect", str(IP2), "7000", "2") != "connected"
    # Layer 3: VM1 routes VM2's address through the gateway; the host does not forward it.
    ip("-n", vm1, "route", "add", f"{IP2}/32", "via", str(host.config.gateway))
    assert net_lab.run(vm1, "connect", str(IP2), "7000", "2") == "timeout"


async def test_reconcile_is_idempotent_and_removes_strays(net_lab: Lab, host: NetworkHost) -> None:
    limits = BandwidthLimits(download=1_000_000, upload=500_000)
    await host.create_tap(VM1, IP1, limits)
    await host.create_tap(VM2, IP2, limits)
    assert await host.create_tap(VM1, IP1, limits) == "hype-aaaaaaaa"  # again: adopted, unchanged
    assert await host.list_taps() == {"hype-aaaaaaaa": 11, "hype-bbbbbbbb": 12}

    first = await host.reconcile({VM1})
    assert first.removed_taps == ("hype-bbbbbbbb",) and not first.rules_rewritten
    snapshot = links(net_lab.srv), run_in_namespace(net_lab.srv, lambda: current_rules(host.config.nft_table))
    second = await host.reconcile({VM1})
    assert second.removed_taps == () and second.removed_upload_classes == () and not second.rules_rewritten
    assert (links(net_lab.srv), run_in_namespace(net_lab.srv, lambda: current_rules(host.config.nft_table))) \
        == snapshot
    assert await host.list_taps() == {"hype-aaaaaaaa": 11}

    # A rule removed by hand, or a stray upload class, is put right by the next reconcile.
    tool("ip", "netns", "exec", net_lab.srv, "nft", "flush", "chain", "inet", host.config.nft_table,
         "forward")
    tool("tc", "-n", net_lab.srv, "class", "add", "dev", host.config.ifb, "parent", "1:1",
         "classid", "1:30", "htb", "rate", "1mbit")
    third = await host.reconcile({VM1})
    assert third.rules_rewritten and third.removed_upload_classes == (0x30,)
    assert await host.delete_tap(VM1) and not await host.delete_tap(VM1)
    assert (await host.reconcile(set())).removed_upload_classes == ()


async def test_a_new_host_adopts_a_running_setup(net_lab: Lab, host: NetworkHost) -> None:
    vm = await plug(net_lab, host, "vm1", VM1, IP1, BandwidthLimits(download=2_000_000))
    host.close()  # the server goes away; the VM and its TAP stay
    restarted = NetworkHost(NetworkConfig.parse(subnet=SUBNET, namespace=net_lab.srv))
    try:
        report = await restarted.start({VM1})
        assert report.removed_taps == () and not report.rules_rewritten
        started(net_lab, net_lab.net, "serve-http", INTERNET_ADDRESS, "8080")
        assert net_lab.run(vm, "fetch", f"http://{INTERNET_ADDRESS}:8080/") == "hello from the internet"
        with pytest.raises(TapError, match="already open"):
            await restarted.open_tap(VM1)  # the "QEMU" (relay) still holds it
    finally:
        restarted.close()


async def test_refusals(net_lab: Lab) -> None:
    ip("-n", net_lab.srv, "addr", "add", "10.214.5.1/16", "dev", "up0")
    overlapping = NetworkHost(NetworkConfig.parse(subnet="10.214.9.0/24", namespace=net_lab.srv))
    with pytest.raises(NetworkConfigError, match=r"up0 holds 10.214.5.1/16"):
        await overlapping.start()
    overlapping.close()
    missing = NetworkHost(NetworkConfig.parse(subnet=SUBNET, namespace=net_lab.srv, uplink="eth9"))
    with pytest.raises(NetworkConfigError, match="uplink 'eth9' does not exist"):
        await missing.start()
    missing.close()
    assert "vmbr0" not in links(net_lab.srv)  # refused before anything was made


def rate_within(measured: float, expected: float) -> None:
    assert abs(measured - expected) <= 0.2 * expected, f"{measured:.0f} B/s, expected {expected:.0f} B/s"


async def test_download_limit_holds(net_lab: Lab, host: NetworkHost) -> None:
    rate = 1_000_000
    vm = await plug(net_lab, host, "vm1", VM1, IP1, BandwidthLimits(download=rate))
    started(net_lab, net_lab.net, "source", INTERNET_ADDRESS, "9000")
    measured = float(net_lab.run(vm, "receive", INTERNET_ADDRESS, "9000", "1", "3"))
    rate_within(measured, rate)


async def test_upload_limit_holds_at_its_ceiling(net_lab: Lab) -> None:
    # The VM alone uses the whole ceiling: rate x 4, within a capacity of 2 MB/s.
    rate, capacity = 250_000, 2_000_000
    own = NetworkHost(NetworkConfig.parse(subnet=SUBNET, namespace=net_lab.srv), upload_capacity=capacity)
    try:
        await own.start(set())
        vm = await plug(net_lab, own, "vm1", VM1, IP1, BandwidthLimits(upload=rate))
        sink = net_lab.start(net_lab.net, "sink", INTERNET_ADDRESS, "9001", "1", "3")
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        net_lab.run(vm, "send", INTERNET_ADDRESS, "9001", "5")
        out, _ = sink.communicate(timeout=30)
        rate_within(float(out.strip()), rate * 4)
        await own.set_limits(VM1, IP1, BandwidthLimits(upload=rate, download=None))
    finally:
        own.close()


async def test_a_missing_namespace_is_created() -> None:
    with lab() as own:
        name = f"{own.prefix}-new"
        own.namespaces.append(name)  # the lab removes it
        fresh = NetworkHost(NetworkConfig.parse(subnet=SUBNET, namespace=name))
        try:
            await fresh.start()  # no default route there: a bridge, no NAT
            assert fresh.uplink is None
        finally:
            fresh.close()
        assert ": lo:" in links(name) and ": vmbr0:" in links(name)
