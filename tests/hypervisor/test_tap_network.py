"""VMs on a real TAP: a ``NetworkHost`` bridge in a namespace the test makes, QEMU (in the host
namespace) given the TAP as a descriptor by the backend, the demo image's httpd answering the
namespace on the VM's own address, through a fresh boot, a standby and restore, and a fork that
gets its own address while its source keeps its own.

Each test builds its namespaces and removes them, kills every VM it started, and checks that the
server process holds no TAP descriptor after any launch or failed launch.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from hypemand.errors import InvalidState
from hypemand.guest.client import AgentClient, AgentError
from hypemand.guest.config_disk import GuestNetwork
from hypemand.hypervisor.base import ForkIdentity, VMMError
from hypemand.hypervisor.process import process_cmdline
from hypemand.hypervisor.qemu import QemuHypervisor, QemuLaunchRecord, QemuVMHandle
from hypemand.images.demo import INDEX_HTML
from hypemand.layout import InstancePaths
from hypemand.network import NetworkHost, allocate, tap_name
from hypemand.savedvm.sparse import copy_sparse
from hypemand.system.files import SystemFiles
from tests.hypervisor.tap_lab import (
    DEMO_READY,
    STARTUP_REFUSALS,
    SentFrames,
    VMs,
    demo_vm_config,
    fd_count,
    guest_network,
    http_get_in,
    make_demo_image,
    needs_netns,
    network_host,
    network_lab,
    tun_fds,
)
from tests.hypervisor.test_qemu_vm import sleeper_vm
from tests.network.lab import Lab
from tests.support.guest import wait_for_console

pytestmark = [pytest.mark.vm, pytest.mark.netns, needs_netns]

# TAP names keep the first 8 characters of the id: they must differ there.
SOURCE, FORK = "source01tapvm", "forked01tapvm"
AGENT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def demo_ext4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_image(tmp_path_factory.mktemp("demo-image"))


@pytest.fixture
def net_lab() -> Iterator[Lab]:
    with network_lab() as own:
        yield own


@pytest.fixture
async def host(net_lab: Lab) -> AsyncIterator[NetworkHost]:
    async with network_host(net_lab.srv) as own:
        yield own


@pytest.fixture
async def vms() -> AsyncIterator[VMs]:
    own = VMs()
    try:
        yield own
    finally:
        await own.kill_all()


async def sh(agent: AgentClient, script: str) -> str:
    done = await agent.run(["sh", "-c", script])
    assert done.exit_code == 0, done
    return done.stdout.decode()


async def launched(vms: VMs, handle: QemuVMHandle) -> QemuVMHandle:
    """A VM just launched: tracked, and the server's copy of its TAP already closed."""
    vms.add(handle)
    assert tun_fds() == [], "the server still holds a TAP descriptor"
    held = [os.readlink(f"/proc/{handle.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{handle.pid}/fd")]
    assert held.count("/dev/net/tun") == 1, held  # QEMU has it...
    shim = handle.record.supervisor_pid
    assert shim is not None
    shim_fds = [os.readlink(f"/proc/{shim}/fd/{fd}") for fd in os.listdir(f"/proc/{shim}/fd")]
    assert "/dev/net/tun" not in shim_fds  # ...and its supervisor does not
    return handle


def link_local(mac: str) -> str:
    """The IPv6 link-local address the kernel derives from ``mac`` (EUI-64)."""
    raw = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([raw[0] ^ 2]) + raw[1:3] + b"\xff\xfe" + raw[3:]
    return str(IPv6Address(b"\xfe\x80" + bytes(6) + eui))


async def link_locals(agent: AgentClient) -> list[str]:
    out = await sh(agent, "ip -6 -o addr show dev eth0 scope link")
    return [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]


def copy_saved_vm(source: Path, target: Path, state_file: Path) -> None:
    """What a snapshot of a running VM copies for a fork: its launch record, device state, RAM
    and writable disks (the image disk is shared, read only)."""
    target.mkdir(parents=True)
    (target / "logs").mkdir()
    src, dst = InstancePaths(source), InstancePaths(target)
    for a, b in ((src.launch_record, dst.launch_record), (src.memory_file, dst.memory_file),
                 (src.overlay_disk, dst.overlay_disk), (src.config_disk, dst.config_disk),
                 (state_file, dst.state_file)):
        copy_sparse(a, b)


async def test_boot_standby_restore_and_fork_on_their_own_addresses(
    net_lab: Lab, host: NetworkHost, vms: VMs, accel_cache_dir: Path, system_files: SystemFiles,
    demo_ext4: Path, tmp_path: Path,
) -> None:
    ns = net_lab.srv
    hv = QemuHypervisor(state_dir=accel_cache_dir)
    hv.tap_opener = host.open_tap  # set after the backend was made, as a server whose network starts late
    assert hv.capabilities().tap_networking
    mine = allocate(host.config.subnet, [])
    await host.create_tap(SOURCE, mine.ip)
    source_dir = tmp_path / SOURCE

    # A fresh boot: the demo page from inside the namespace, on the VM's own address.
    config = demo_vm_config(system_files, demo_ext4, source_dir, guest_network(host, mine.ip), mine.mac)
    source = await launched(vms, await hv.start(config))
    await wait_for_console(source, DEMO_READY)
    assert await http_get_in(ns, mine.ip, refusals=STARTUP_REFUSALS) == INDEX_HTML
    agent = await AgentClient.connect(source.agent_socket_path, timeout=AGENT_TIMEOUT)
    try:
        assert (await sh(agent, "cat /sys/class/net/eth0/address")).strip() == mine.mac
    finally:
        await agent.close()

    # Adoption after a server restart: QEMU's command line is the recorded one, fd number and all.
    launch = QemuLaunchRecord.load(source_dir)
    assert launch is not None and process_cmdline(source.pid) == launch.argv
    assert any(arg.startswith("tap,id=net0,fd=") for arg in launch.argv)
    await source.close()  # the old server's handle (QMP takes one client at a time)
    adopted = await QemuHypervisor(state_dir=accel_cache_dir).adopt(source_dir)
    assert adopted is not None and adopted.pid == source.pid
    source = vms.add(adopted)
    assert hv.find_orphans(tmp_path) == []

    # Standby: the TAP goes once QEMU is gone, comes back, and the restored VM answers at once.
    state_file = InstancePaths(source_dir).state_file
    await hv.save_state(source, state_file)
    await hv.end_saved(source)
    assert not source.is_alive()
    assert await host.delete_tap(SOURCE)
    await host.create_tap(SOURCE, mine.ip)
    source = await launched(vms, await hv.restore(source_dir, state_file))
    assert await http_get_in(ns, mine.ip) == INDEX_HTML
    restored = QemuLaunchRecord.load(source_dir)
    assert restored is not None and process_cmdline(source.pid) == restored.argv

    # A fork: snapshot the running source (paused while its files are copied), give the copy a
    # new id and MAC, a TAP of its own, and, once it runs, its own address.
    theirs = allocate(host.config.subnet, [(mine.ip, mine.mac)])
    fork_dir = tmp_path / FORK
    await hv.save_state(source, state_file)
    try:
        await asyncio.to_thread(copy_saved_vm, source_dir, fork_dir, state_file)
    finally:
        await source.resume()
    await asyncio.to_thread(hv.prepare_fork, fork_dir, ForkIdentity(vm_id=FORK, mac=theirs.mac))
    await host.create_tap(FORK, theirs.ip)
    # The fork runs unplugged: its guest holds the source's MAC and IP until it has its identity,
    # and announces them as every restored guest does; the bridge would then send the source's
    # traffic to the fork's port.
    sent = SentFrames(ns, tap_name(FORK))
    fork_agent: AgentClient | None = None
    try:
        fork_state = InstancePaths(fork_dir).state_file
        fork = await launched(vms, await hv.restore(fork_dir, fork_state, nic_down=True))
        agent = fork_agent = await AgentClient.connect(fork.agent_socket_path, timeout=AGENT_TIMEOUT)
        await agent.set_identity(os.urandom(64), mac=theirs.mac, hostname="fork-1",
                                 network=guest_network(host, theirs.ip))
        assert sent.sources() == []  # nothing left the fork while it was unplugged
        await fork.set_nic_link(True)
        assert await http_get_in(ns, theirs.ip) == INDEX_HTML
        assert await http_get_in(ns, mine.ip) == INDEX_HTML
        assert set(sent.stop()) == {theirs.mac}  # its own MAC only, never the source's

        assert (await sh(agent, "ip -4 -o addr show dev eth0")).split()[3] == f"{theirs.ip}/24"
        assert len((await sh(agent, "ip -4 -o addr show dev eth0")).splitlines()) == 1
        assert f"default via {host.config.gateway} dev eth0" in await sh(agent, "ip -4 route")
        identity = await sh(agent, "cat /sys/class/net/eth0/address; hostname")
        assert identity.split() == [theirs.mac, "fork-1"]
        # The MAC changed with the link up: IPv6's link-local address, derived from the MAC, is
        # made anew from the fork's once the carrier comes, as after a link down and up.
        for _ in range(100):
            if link_local(theirs.mac) in await link_locals(agent):
                break
            await asyncio.sleep(0.05)
        assert await link_locals(agent) == [link_local(theirs.mac)]

        # Bad input is refused before anything changes: the fork keeps its address, MAC, name.
        everything = "ip -4 -o addr; ip -4 route; cat /sys/class/net/eth0/address; hostname"
        before = await sh(agent, everything)
        for bad in (GuestNetwork(ip="10.215.0.255", prefix=24, gateway=str(host.config.gateway)),  # broadcast
                    GuestNetwork(ip=str(theirs.ip), prefix=24, gateway="10.216.0.1"),  # gateway elsewhere
                    GuestNetwork(ip="224.1.2.3", prefix=24, gateway=None)):  # multicast
            with pytest.raises(AgentError) as info:
                await agent.set_identity(os.urandom(64), mac="02:00:00:99:99:99", hostname="never",
                                         network=bad)
            assert info.value.errno == errno.EINVAL, info.value
        assert await sh(agent, everything) == before
        assert await http_get_in(ns, theirs.ip) == INDEX_HTML
    finally:
        sent.stop()
        if fork_agent is not None:
            await fork_agent.close()
    assert await http_get_in(ns, mine.ip) == INDEX_HTML


async def test_no_tap_descriptor_outlives_a_launch_that_fails(
    net_lab: Lab, host: NetworkHost, vms: VMs, accel_cache_dir: Path, system_files: SystemFiles,
    demo_ext4: Path, tmp_path: Path,
) -> None:
    """QEMU exiting at once, an opener that fails, a TAP another QEMU holds, a launch cancelled
    while its TAP was being opened: the server holds no TAP afterwards, nor any other descriptor."""
    hv = QemuHypervisor(state_dir=accel_cache_dir, tap_opener=host.open_tap)
    mine = allocate(host.config.subnet, [])
    network = guest_network(host, mine.ip)
    config = demo_vm_config(system_files, demo_ext4, tmp_path / SOURCE, network, mine.mac)
    await hv.vmm_shim()
    await hv.acceleration()
    baseline = fd_count()

    # No TAP made: the network's open fails, and nothing starts.
    with pytest.raises(VMMError, match="cannot open its TAP"):
        await hv.start(config)
    assert fd_count() == baseline

    # QEMU exits at once (its image disk is gone): the TAP was passed, and closed.
    await host.create_tap(SOURCE, mine.ip)
    missing_image = config.disks[0].model_copy(update={"path": tmp_path / "none"})
    broken = config.model_copy(update={"disks": [missing_image, *config.disks[1:]]})
    with pytest.raises(VMMError):
        await hv.start(broken)
    assert fd_count() == baseline and tun_fds() == []

    # A TAP that a running QEMU holds cannot be opened a second time.
    running = await launched(vms, await hv.start(config))
    other = config.model_copy(update={"directory": tmp_path / "other"})
    with pytest.raises(VMMError, match="already open"):
        await hv.start(other)
    await running.kill()
    await running.close()
    assert fd_count() == baseline and tun_fds() == []

    # The TAP is free the moment that QEMU is gone (its supervisor kept no copy).
    fd = await host.open_tap(SOURCE)
    os.close(fd)

    # Cancelled while the TAP was being opened: the descriptor arrives later and is closed.
    opened = asyncio.Event()
    release = asyncio.Event()

    async def slow_opener(vm_id: str) -> int:
        fd = await host.open_tap(vm_id)
        opened.set()
        await release.wait()
        return fd

    hv.tap_opener = slow_opener
    starting = asyncio.ensure_future(hv.start(config))
    await opened.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    release.set()
    for _ in range(20):  # the open completes, then its done-callback closes the descriptor
        await asyncio.sleep(0)
    assert tun_fds() == [] and fd_count() == baseline

    # Without any opener, a TAP VM is refused with a reason.
    hv.tap_opener = None
    with pytest.raises(VMMError, match="no VM network"):
        await hv.start(config)
    assert fd_count() == baseline


async def test_a_vm_without_a_nic_cannot_be_unplugged(
    vms: VMs, accel_cache_dir: Path, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    hv = QemuHypervisor(state_dir=accel_cache_dir)
    handle = vms.add(await hv.start(sleeper_vm(system_files, busybox_ext4, tmp_path / "vm")))
    with pytest.raises(InvalidState, match="no NIC"):
        await handle.set_nic_link(False)
