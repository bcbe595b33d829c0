"""The VM network through the official SDK in strict mode, on real VMs: each VM on the server's
bridge with its own address, reaching "the internet" through NAT, unreachable from the other
VMs, keeping its address and its open connections across standby and restore and across a
server restart, and forks of one snapshot each on their own address.

The server builds its network in a namespace of the harness's; the lab (tests/network/lab.py)
joins a second namespace to it, "the internet" (198.51.100.1), with an HTTP server. Requests
to the VMs are sent from inside the server's namespace; nothing touches the root namespace.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypeman import BadRequestError, Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from hypemand.network import tap_name
from hypemand.network.namespace import run_in_namespace
from tests.api.conftest import SMALL
from tests.api.test_instances_lifecycle import qemu_pids
from tests.network.lab import INTERNET_ADDRESS, Lab, netns_supported
from tests.support.harness import (
    Harness,
    ServerProcess,
    remove_namespace,
    report,
    server_environment,
    strict_client,
)
from tests.support.net import free_port

pytestmark = [pytest.mark.vm, pytest.mark.netns]

SUBNET = IPv4Network("10.100.0.0/16")
INTERNET_PORT = 8080
ECHO_PORT = 7000
# (Debian's busybox wget crashes with -T: timeouts are busybox timeout's.)
# busybox httpd (the image's page) in the background, and a line echo server in the foreground.
SERVES = {"entrypoint": ["/bin/sh", "-c"],
          "cmd": [f"httpd -p 80 -h /www; exec nc -ll -p {ECHO_PORT} -e cat"]}


@pytest.fixture(scope="module")
def world(module_harness: Harness) -> Iterator[tuple[Lab, ServerProcess]]:
    """A server whose namespace reaches "the internet"; the lab goes first at teardown (its
    namespace, and with it the veth), then the harness deletes the VMs and the server's."""
    if (why := netns_supported()) is not None:
        pytest.skip(why)
    lab = Lab()
    try:
        data = module_harness.root / "data"
        namespace = module_harness.namespace_of(data)
        assert namespace is not None
        lab.connect_internet(namespace)
        web = lab.start(lab.net, "serve-http", INTERNET_ADDRESS, str(INTERNET_PORT))
        assert web.stdout is not None and web.stdout.readline().strip() == "ready"
        server = module_harness.start(data)
        demo.install(server.base_url, server.token, wait_seconds=300)
        yield lab, server
    finally:
        assert not lab.close()


@pytest.fixture
def sdk(world: tuple[Lab, ServerProcess]) -> Iterator[Hypeman]:
    with strict_client(world[1]) as client:
        yield client


@pytest.fixture(autouse=True)
def one_test_at_a_time(world: tuple[Lab, ServerProcess]) -> Iterator[None]:
    """Each test's VMs go when it ends: two cores hold eight small vCPUs."""
    yield
    with strict_client(world[1]) as client:
        for instance in client.instances.list():
            client.instances.delete(instance.id)
        for snapshot in client.snapshots.list():
            client.snapshots.delete(snapshot.id)


def namespace_of(harness: Harness) -> str:
    namespace = harness.namespace_of(harness.root / "data")
    assert namespace is not None
    return namespace


def running(sdk: Hypeman, name: str, **extra: object) -> tuple[str, str]:
    """A Running VM serving its page and the echo port: (id, ip)."""
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **{**SMALL, **SERVES, **extra})  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    instance = sdk.instances.get(created.id)
    assert instance.network is not None and instance.network.ip is not None
    return created.id, instance.network.ip


def guest_sh(sdk: Hypeman, instance: str, script: str) -> tuple[int, str]:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    return result.exit_code, result.output.decode(errors="replace")


def page_of(namespace: str, ip: str) -> str:
    """The VM's page at ``ip``, fetched from inside the server's namespace."""
    return run_in_namespace(namespace, partial(_http_get, ip))


def test_each_vm_has_its_own_address_on_the_bridge_and_reaches_out_through_nat(
    sdk: Hypeman, world: tuple[Lab, ServerProcess], module_harness: Harness
) -> None:
    first, first_ip = running(sdk, "net-one")
    second, second_ip = running(sdk, "net-two")
    assert first_ip != second_ip
    for instance, ip in ((first, first_ip), (second, second_ip)):
        network = sdk.instances.get(instance).network
        assert network is not None and network.enabled and network.name == "default"
        assert IPv4Address(ip) in SUBNET and IPv4Address(ip) != IPv4Address("10.100.0.1")
        assert network.mac is not None and network.mac.startswith("02:00:00:")
        # The guest has what the API says.
        code, shown = guest_sh(sdk, instance, "ip -4 -o addr show eth0; cat /sys/class/net/eth0/address")
        assert code == 0 and f"{ip}/16" in shown and network.mac in shown, shown
    # Out through NAT: "the internet" answers.
    code, page = guest_sh(sdk, first, f"timeout 10 wget -q -O - http://{INTERNET_ADDRESS}:{INTERNET_PORT}/")
    assert code == 0 and "hello from the internet" in page, page
    # In from the server's namespace (where the ingress proxy lives): the VM's own page.
    assert "busybox httpd" in page_of(namespace_of(module_harness), first_ip)


def test_vms_cannot_reach_each_other(sdk: Hypeman) -> None:
    first, _ = running(sdk, "island-one")
    _, second_ip = running(sdk, "island-two")
    _, out = guest_sh(sdk, first, f"timeout 3 wget -q -O - http://{second_ip}/ 2>&1; echo rc=$?")
    assert "rc=0" not in out, out
    # Not even the neighbour's ARP answer crosses the isolated bridge ports: its entry stays
    # incomplete (no hardware address), while the gateway's is complete.
    pings = f"ping -c 1 -W 2 10.100.0.1 >/dev/null; ping -c 1 -W 2 {second_ip} >/dev/null"
    _, table = guest_sh(sdk, first, f"{pings}; cat /proc/net/arp")
    entries = {line.split()[0]: line.split()[3] for line in table.splitlines()[1:] if line.strip()}
    assert entries.get(second_ip, "00:00:00:00:00:00") == "00:00:00:00:00:00", table
    assert entries.get("10.100.0.1", "00:00:00:00:00:00") != "00:00:00:00:00:00", table


def test_an_open_connection_and_the_address_survive_standby_and_restore(
    sdk: Hypeman, module_harness: Harness
) -> None:
    instance, ip = running(sdk, "sleeper")
    before = sdk.instances.get(instance).network
    namespace = namespace_of(module_harness)
    connection = run_in_namespace(namespace, partial(connect_when_listening, ip, ECHO_PORT))
    with connection:
        connection.sendall(b"before\n")
        assert connection.recv(64) == b"before\n"
        assert sdk.instances.standby(instance).state == "Standby"
        standby = sdk.instances.get(instance).network
        assert standby is not None and standby.ip == ip and before is not None and standby.mac == before.mac
        assert sdk.instances.restore(instance).state == "Running"
        connection.sendall(b"after\n")
        assert connection.recv(64) == b"after\n"
    after = sdk.instances.get(instance).network
    assert after is not None and before is not None and (after.ip, after.mac) == (before.ip, before.mac)


def test_stop_releases_the_address_and_start_takes_one_again(sdk: Hypeman, world: tuple[Lab, ServerProcess],
                                                              module_harness: Harness) -> None:
    instance, _ = running(sdk, "stopper")
    stopped = sdk.instances.stop(instance)
    assert stopped.network is not None and stopped.network.ip is None
    sdk.instances.start(instance)
    assert sdk.instances.wait(instance, state="Running", api_timeout="90s").state == "Running"
    again = sdk.instances.get(instance).network
    assert again is not None and again.ip is not None
    assert "busybox httpd" in page_of(namespace_of(module_harness), again.ip)


def test_forks_of_one_snapshot_each_answer_on_their_own_address(
    sdk: Hypeman, world: tuple[Lab, ServerProcess], module_harness: Harness
) -> None:
    source, source_ip = running(sdk, "fork-source")
    snapshot = sdk.instances.snapshots.create(source, kind="Standby", name="net-fork-snap")
    forks = [sdk.snapshots.fork(snapshot.id, name=f"net-fork-{n}", target_state="Running") for n in (1, 2)]
    addresses = {source_ip}
    for fork in forks:
        network = sdk.instances.get(fork.id).network
        assert network is not None and network.ip is not None and network.ip not in addresses
        addresses.add(network.ip)
        # The guest took its new address before the fork was reported Running.
        code, shown = guest_sh(sdk, fork.id, "ip -4 -o addr show eth0; hostname")
        assert code == 0 and f"{network.ip}/16" in shown and source_ip not in shown, shown
        assert fork.name in shown
        page = page_of(namespace_of(module_harness), network.ip)
        assert "busybox httpd" in page
    assert "busybox httpd" in page_of(namespace_of(module_harness), source_ip)


def test_a_vm_without_network_has_no_nic(sdk: Hypeman) -> None:
    created = sdk.instances.create(name="offline", image=demo.DEMO_NAME, network={"enabled": False},
                                   **{**SMALL, **SERVES})  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    network = sdk.instances.get(created.id).network
    assert network is not None and not network.enabled and network.ip is None and network.mac is None
    code, links = guest_sh(sdk, created.id, "ls /sys/class/net")
    assert code == 0 and "eth0" not in links, links


def test_bandwidth_limits_are_shown_and_refused_when_malformed(sdk: Hypeman) -> None:
    limits = {"bandwidth_download": "8Mbps", "bandwidth_upload": "125KB/s"}
    instance, _ = running(sdk, "limited", network=limits)
    network = sdk.instances.get(instance).network
    assert network is not None
    assert (network.bandwidth_download, network.bandwidth_upload) == ("8Mbps", "1Mbps")
    allocation = next(a for a in sdk.resources.get().allocations if a.instance_id == instance)
    assert (allocation.network_download_bps, allocation.network_upload_bps) == (1_000_000, 125_000)
    for bad, code in (({"bandwidth_download": "fast"}, "invalid_bandwidth_download"),
                      ({"bandwidth_upload": "10M"}, "invalid_bandwidth_upload"),
                      ({"egress": {"enabled": True}}, "not_supported")):
        with pytest.raises(BadRequestError) as refused:
            sdk.instances.create(name="refused", image=demo.DEMO_NAME, network=bad, **SMALL)  # type: ignore[arg-type]
        assert code in str(refused.value), refused.value
    assert all(i.name != "refused" for i in sdk.instances.list())


def test_a_download_limit_holds_within_20_percent(sdk: Hypeman) -> None:
    rate = 250_000  # bytes per second: well under what a TCG guest can take in
    instance, _ = running(sdk, "shaped", network={"bandwidth_download": f"{rate}B/s"})
    size = rate * 6
    url = f"http://{INTERNET_ADDRESS}:{INTERNET_PORT}/bytes/{size}"
    # Timed inside the guest from its first byte to its last (no exec or connect overheads).
    script = (f"timeout 30 wget -q -O /dev/null {url}; s=$(cut -d' ' -f1 /proc/uptime); "
              f"timeout 30 wget -q -O /tmp/x {url}; e=$(cut -d' ' -f1 /proc/uptime); "
              "wc -c < /tmp/x; echo $s $e")
    code, out = guest_sh(sdk, instance, script)
    assert code == 0, out
    received, times = out.strip().splitlines()[-2:]
    start, end = (float(t) for t in times.split())
    measured = int(received) / (end - start)
    assert int(received) == size
    assert rate * 0.8 <= measured <= rate * 1.2, f"{measured:.0f} B/s for a limit of {rate} B/s"


def test_capabilities_and_resources_describe_the_bridge(sdk: Hypeman) -> None:
    network = sdk.capabilities.get().network
    assert (network.model, network.gateway, network.subnet, network.guest_to_guest) == (
        "bridge", "10.100.0.1", "10.100.0.0/16", False)
    shared = sdk.resources.get().network
    # The veth uplink says 10 Gbit/s.
    assert shared.capacity == 10_000_000_000 // 8 and shared.oversub_ratio == 2.0


def test_a_restarted_server_keeps_every_address_and_hands_out_no_duplicate(harness: Harness) -> None:
    if (why := netns_supported()) is not None:
        pytest.skip(why)
    server = harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    data = server.data_dir
    namespace = harness.namespace_of(data)
    assert namespace is not None
    with strict_client(server) as sdk:
        kept, kept_ip = running(sdk, "kept")
        saved, saved_ip = running(sdk, "saved")
        died, _ = running(sdk, "died")
        sdk.instances.standby(saved)
    assert {tap_name(kept), tap_name(died)} <= links_in(namespace)
    server.process.kill()
    server.process.wait(timeout=30)
    # While no server runs, one VM ends: its TAP is a stray the next server removes.
    (qemu,) = [pid for pid in qemu_pids(data) if Path(f"/proc/{pid}/cwd").resolve().name == died]
    os.kill(qemu, signal.SIGKILL)
    server = harness.start(data, port=server.port)
    with strict_client(server) as sdk:
        assert sdk.instances.get(kept).network.ip == kept_ip  # type: ignore[union-attr]
        assert sdk.instances.get(saved).network.ip == saved_ip  # type: ignore[union-attr]
        assert tap_name(died) not in links_in(namespace) and tap_name(kept) in links_in(namespace)
        fresh, fresh_ip = running(sdk, "fresh")
        assert fresh_ip not in (kept_ip, saved_ip)
        assert sdk.instances.restore(saved).state == "Running"
        for ip in (kept_ip, saved_ip, fresh_ip):
            assert "busybox httpd" in page_of(namespace, ip)
        sdk.instances.delete(fresh)
        assert tap_name(fresh) not in links_in(namespace)


def links_in(namespace: str) -> set[str]:
    shown = subprocess.run(["ip", "-n", namespace, "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in shown.stdout.splitlines()}


@pytest.mark.parametrize(("setting", "said"), [
    ({"UPLINK_INTERFACE": "no-such-if"}, "uplink 'no-such-if' does not exist"),
    ({"SUBNET_CIDR": "10.100.0.0/33"}, "10.100.0.0/33"),
    ({"NETWORK_LIMIT": "fast"}, "NETWORK_LIMIT"),
])
def test_a_network_setting_that_cannot_work_stops_the_server_with_one_line(
    setting: dict[str, str], said: str, tmp_path: Path
) -> None:
    if (why := netns_supported()) is not None:
        pytest.skip(why)
    namespace = f"hmt-{os.urandom(4).hex()}"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hypemand.cli.main", "serve", "--port", str(free_port()),
             "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120, env={**server_environment(namespace), **setting},
        )
    finally:
        remove_namespace(namespace)
    assert result.returncode == 1, result
    assert "hypemand: cannot start:" in result.stderr and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def connect_when_listening(ip: str, port: int) -> socket.socket:
    """A connection to a guest's server, once it listens: Running says the program started, not
    that the server it starts (second in its script) has bound its port yet."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection((ip, port), timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _http_get(ip: str) -> str:
    deadline = time.monotonic() + 10
    with connect_when_listening(ip, 80) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while time.monotonic() < deadline and (chunk := conn.recv(65536)):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_user_mode_networking_is_the_fallback_with_egress(tmp_path: Path) -> None:
    """Where no bridge can be built (here: chosen), every VM gets QEMU's user-mode NIC, said in
    /capabilities, and still reaches out: the host's loopback is 10.0.2.2 to it."""
    user_mode = Harness(tmp_path / "user-mode", network="user")
    try:
        server = user_mode.start()
        demo.install(server.base_url, server.token, wait_seconds=300)
        with HTTPServer(("127.0.0.1", 0), _Hello) as host_web, strict_client(server) as sdk:
            threading.Thread(target=host_web.serve_forever, daemon=True).start()
            try:
                network = sdk.capabilities.get().network
                assert (network.model, network.gateway, network.subnet) == ("nat", "10.0.2.2", "10.0.2.0/24")
                assert sdk.resources.get().network.capacity == 0
                instance, ip = running(sdk, "user-mode")
                assert ip == "10.0.2.15"
                port = host_web.server_address[1]
                code, page = guest_sh(sdk, instance, f"timeout 10 wget -q -O - http://10.0.2.2:{port}/")
                assert code == 0 and page == "hello from the host\n", page
                with pytest.raises(BadRequestError, match="bridge network"):
                    sdk.instances.create(name="limited", image=demo.DEMO_NAME,
                                         network={"bandwidth_download": "1Gbps"}, **SMALL)  # type: ignore[arg-type]
            finally:
                host_web.shutdown()
    finally:
        report(user_mode.finish(), "the user-mode server left problems")


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
