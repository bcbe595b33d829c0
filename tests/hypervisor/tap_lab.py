"""Helpers for VMs on a real TAP network: a namespace with a ``NetworkHost`` in it, the demo
image, HTTP from inside the namespace, and VMs that are always killed.

Everything network-related lives in namespaces the test makes (``tests/network/lab.py``, names
``hmtest-<random>-<role>``), never in the root namespace; traffic goes only to addresses inside
them. A socket takes the network namespace of the thread that creates it, so every request
is made from a thread that joined the namespace (``run_in_namespace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from hypemand.guest.config_disk import GuestConfig, GuestNetwork
from hypemand.hypervisor.base import VMConfig
from hypemand.hypervisor.process import ProcessWatch
from hypemand.hypervisor.qemu import QemuVMHandle
from hypemand.images import demo
from hypemand.network import NetworkConfig, NetworkHost
from hypemand.network.namespace import join_namespace, run_in_namespace
from hypemand.system.files import SystemFiles
from tests.network.lab import Lab, lab, netns_supported, root_links
from tests.support.guest import guest_spec, make_ext4_image, prepared_vm_config

SUBNET = "10.215.0.0/24"
PREFIX = 24
DEMO_READY = "hypeman demo: busybox httpd listening on port 80"
DEMO_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
HTTP_TIMEOUT = 20.0  # one request to a TCG guest on a loaded 2-core host
# httpd binds its port just after the demo prints its line: connections refused until then.
STARTUP_REFUSALS = 50
STARTUP_RETRY = 0.2

why_not = netns_supported()
needs_netns = pytest.mark.skipif(why_not is not None, reason=why_not or "")


def tun_fds() -> list[str]:
    """This process' descriptors on /dev/net/tun: a TAP the server still holds."""
    held = []
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry) == "/dev/net/tun":
                held.append(entry.name)
    return held


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- the network -------------------------------------------------------------------------------


@contextlib.contextmanager
def network_lab() -> Iterator[Lab]:
    """The lab's server namespace (with an uplink, which NetworkHost wants) and "internet";
    removed at the end, and the root namespace checked to have gained no device."""
    before = root_links()
    with lab() as own:
        own.build_internet()
        yield own
    after = root_links()
    assert "vmbr" not in after and "hype-" not in after, "a device appeared in the root namespace"
    assert after.count("\n") == before.count("\n")


@contextlib.asynccontextmanager
async def network_host(namespace: str) -> AsyncIterator[NetworkHost]:
    host = NetworkHost(NetworkConfig.parse(subnet=SUBNET, namespace=namespace))
    try:
        await host.start(set())
        yield host
    finally:
        host.close()


def guest_network(host: NetworkHost, ip: IPv4Address) -> GuestNetwork:
    return GuestNetwork(ip=str(ip), prefix=PREFIX, gateway=str(host.config.gateway))


async def http_get_in(namespace: str, address: IPv4Address | str, refusals: int = 0) -> str:
    """The body of ``GET http://<address>/``, asked from inside ``namespace``. A refused
    connection is retried ``refusals`` times (a server still starting); anything else raises."""

    def fetch() -> str:
        with socket.create_connection((str(address), 80), timeout=HTTP_TIMEOUT) as sock:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
        return body.decode()

    for _ in range(refusals):
        try:
            return await asyncio.to_thread(run_in_namespace, namespace, fetch)
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise
            await asyncio.sleep(STARTUP_RETRY)
    return await asyncio.to_thread(run_in_namespace, namespace, fetch)


class SentFrames:
    """The source MACs of the frames a VM sends on its TAP, as the namespace's side of the TAP
    receives them, recorded by a thread in the namespace until :meth:`stop`."""

    def __init__(self, namespace: str, tap: str) -> None:
        self._frames: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(namespace, tap), daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def _run(self, namespace: str, tap: str) -> None:
        try:
            join_namespace(namespace)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
            sock.bind((tap, 0))
            sock.settimeout(0.05)
        except BaseException as exc:  # reported by the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        with sock:
            while not self._stop.is_set():
                try:
                    frame, address = sock.recvfrom(65536)
                except TimeoutError:
                    continue
                if address[2] != socket.PACKET_OUTGOING:  # to the VM: not the VM's
                    with self._lock:
                        self._frames.append(frame[6:12].hex(":"))

    def sources(self) -> list[str]:
        with self._lock:
            return list(self._frames)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        return self.sources()


# ---- the guest ---------------------------------------------------------------------------------


def make_demo_image(directory: Path) -> Path:
    """The demo image's root file system (``hypemand demo-image``: static busybox, httpd serving
    /www on port 80) as an ext4 disk."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed for VM tests"
    tree = directory / "rootfs"
    demo._make_rootfs(tree, Path(busybox))
    return make_ext4_image(tree, directory / "demo.ext4")


def demo_vm_config(
    system: SystemFiles, image: Path, directory: Path, network: GuestNetwork, mac: str
) -> VMConfig:
    """The demo program with a static address on a TAP NIC: the disks ``boot_guest`` would make
    (the config disk carrying ``network``), and the ``VMConfig`` with ``tap_network``."""
    guest = GuestConfig(cmd=list(demo.DEMO_CMD), env=DEMO_ENV, network=network)
    config = prepared_vm_config(system, guest_spec(directory, image, guest, network=False))
    return VMConfig.model_validate({**config.model_dump(), "tap_network": True, "nic_mac": mac})


class VMs:
    """The VMs a test started: every one is killed at the end, whatever happened."""

    def __init__(self) -> None:
        self._handles: list[QemuVMHandle] = []

    def add(self, handle: QemuVMHandle) -> QemuVMHandle:
        self._handles.append(handle)
        return handle

    async def kill_all(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(Exception):
                if handle.is_alive():
                    await handle.kill()
            with contextlib.suppress(Exception):
                await handle.close()
            # A closed handle no longer sees its VMM: find it again by its recorded identity.
            watch = ProcessWatch.open(handle.record)
            if watch is not None:
                watch.send_signal(signal.SIGKILL)
                await watch.wait(10)
                watch.close()
