"""A small lab of network namespaces for the network tests, torn down whatever happens.

Every namespace is named ``hmtest-<random>-<role>`` and made by the lab; nothing is put in the
root namespace and no traffic leaves the lab's namespaces:

    <p>-srv   the server's namespace: NetworkHost's bridge, TAPs, rules; uplink ``up0``
              198.51.100.2/24 with the default route via 198.51.100.1
    <p>-net   "the internet": ``wan0`` 198.51.100.1/24, where test servers listen
    <p>-vmN   one per simulated VM: a TAP ``eth0`` with the VM's address, default route via the
              gateway. A relay thread copies frames between it and the VM's TAP in <p>-srv,
              opened with NetworkHost.open_tap as QEMU's would be: the relay plays QEMU.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from hypemand.network.namespace import run_in_namespace
from hypemand.network.tap import open_tap_fd

INTERNET_ADDRESS = "198.51.100.1"
UPLINK_ADDRESS = "198.51.100.2"
TRAFFIC = Path(__file__).with_name("traffic.py")
COMMAND_TIMEOUT = 60


def tool(*argv: str) -> None:
    """Run a command-line tool (ip, tc, nft) for the lab's setup; fails loudly."""
    subprocess.run(argv, check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


def ip(*args: str) -> None:
    tool("ip", *args)


def netns_supported() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if subprocess.run(["sh", "-c", f"command -v {tool} || test -x /usr/sbin/{tool}"],
                          capture_output=True).returncode != 0:
            return f"needs {tool}"
    name = f"hmtest-{secrets.token_hex(4)}-probe"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as err:
        return f"cannot create a network namespace: {err}"
    ip("netns", "del", name)
    return None


class Relay:
    """Copies Ethernet frames both ways between two TAP descriptors until stopped."""

    def __init__(self, left: int, right: int) -> None:
        self._fds = (left, right)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tap-relay")
        self._thread.start()

    def _run(self) -> None:
        left, right = self._fds
        peer = {left: right, right: left}
        with selectors.DefaultSelector() as selector:
            selector.register(left, selectors.EVENT_READ)
            selector.register(right, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fd == self._wake_r:
                        return
                    try:
                        frame = os.read(key.fd, 65536)
                        os.write(peer[key.fd], frame)
                    except OSError:  # a frame the other side refuses (link down): dropped
                        continue

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        for fd in (*self._fds, self._wake_r, self._wake_w):
            os.close(fd)


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: f"hmtest-{secrets.token_hex(3)}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)

    @property
    def srv(self) -> str:
        return f"{self.prefix}-srv"

    @property
    def net(self) -> str:
        return f"{self.prefix}-net"

    def add_namespace(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def build_internet(self) -> None:
        """The server's namespace and "the internet", joined by a veth pair."""
        self.add_namespace("srv")
        self.connect_internet(self.srv)

    def connect_internet(self, server_namespace: str) -> None:
        """"The internet" (a namespace of the lab's) joined by a veth pair to
        ``server_namespace`` (made here if missing, but not removed by the lab: a test server's
        namespace is its harness's to remove), whose default route it becomes."""
        if not Path("/var/run/netns", server_namespace).exists():
            ip("netns", "add", server_namespace)
            ip("-n", server_namespace, "link", "set", "lo", "up")
        self.add_namespace("net")
        ip("-n", server_namespace, "link", "add", "up0", "type", "veth", "peer", "name", "wan0",
           "netns", self.net)
        ip("-n", server_namespace, "addr", "add", f"{UPLINK_ADDRESS}/24", "dev", "up0")
        ip("-n", self.net, "addr", "add", f"{INTERNET_ADDRESS}/24", "dev", "wan0")
        ip("-n", server_namespace, "link", "set", "up0", "up")
        ip("-n", self.net, "link", "set", "wan0", "up")
        ip("-n", server_namespace, "route", "add", "default", "via", INTERNET_ADDRESS)

    def plug_vm(self, role: str, tap_fd: int, address: IPv4Address, prefixlen: int,
                gateway: IPv4Address) -> str:
        """A namespace standing for a VM behind the TAP whose descriptor is ``tap_fd`` (the
        relay owns it from now on)."""
        vm = self.add_namespace(role)
        ip("-n", vm, "tuntap", "add", "eth0", "mode", "tap")
        ip("-n", vm, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
        ip("-n", vm, "link", "set", "eth0", "up")
        ip("-n", vm, "route", "add", "default", "via", str(gateway))

        def open_guest_side() -> int:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                return open_tap_fd(ipr, "eth0", vnet_hdr=False)

        self.relays.append(Relay(tap_fd, run_in_namespace(vm, open_guest_side)))
        return vm

    def start(self, namespace: str, *args: str) -> subprocess.Popen[str]:
        """traffic.py with ``args`` in the namespace, in the background."""
        process = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, str(TRAFFIC), *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(process)
        return process

    def run(self, namespace: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """traffic.py with ``args`` in the namespace; its output, or an error with its stderr."""
        process = self.start(namespace, *args)
        out, err = process.communicate(timeout=timeout)
        if process.returncode != 0:
            raise AssertionError(f"traffic.py {' '.join(args)} in {namespace} failed: {err.strip()}")
        return out.strip()

    def close(self) -> list[str]:
        problems: list[str] = []
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=10)
        for relay in self.relays:
            relay.stop()
        for name in reversed(self.namespaces):
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"ip netns del {name}: {done.stderr.strip()}")
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        problems += [f"namespace {line.split()[0]} left behind" for line in leftover.splitlines()
                     if line.startswith(self.prefix)]
        return problems


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    own = Lab()
    try:
        yield own
    finally:
        problems = own.close()
    assert not problems, problems


def root_links() -> str:
    """The root namespace's interface names, to check nothing of the lab appeared there."""
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
