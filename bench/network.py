"""The VM network through the API: TAP against user mode, Caddy against straight, restore and fork.

    .venv/bin/python -m bench.network [--quick] [--runs N] [--mb 30] [--requests 250]
                                      [--concurrency 8] [--cycles 9] [--forks 7]

Two real ``hypemand serve`` processes driven through the official SDK in strict mode, with the
busybox demo image pushed into each: one on the bridge, its network built in a namespace this
bench makes (``hmb-<random>``, removed at the end: no bridge, TAP or address ever lands in the
root namespace), and one forced to QEMU's user-mode networking (``HYPEMAND_NETWORK_MODE=user``).
Every figure is a ratio against its counterpart in the same run, runs alternated, medians:

- **TAP vs user mode throughput**, one VM on each server (256 MiB, 1 vCPU; the bridge VM
  created with 10 Gbit/s limits both ways, so the shaping is there but never the cap). The
  guest opens every connection: user mode has no port forward into the guest (the server sets
  none up), so "host -> guest" is the guest pulling from the host, the same on both sides.
  Both ways the guest runs ``nc HOST PORT -e dd ...`` (dd gets the connection as its stdin and
  stdout, 64 KiB per call; busybox nc's own copy loop moves ~1 KiB per call and holds a TCG
  guest to a few MB/s either way): download, ``dd of=/dev/null`` of N MB a source of this bench sends;
  upload, ``dd if=/dev/zero`` of N MB into a sink of this bench. The host end is a socket
  made in the server's namespace (reached by the guest as the bridge's gateway) for TAP, and on
  127.0.0.1 in the root namespace (QEMU's slirp gives the host's loopback to the guest as
  10.0.2.2) for user mode. Timed on the host end, from the accepted connection to the last
  byte (download: until the guest, having read to the end, closes; upload: until the guest's
  EOF), so no exec round trip is counted.
- **requests/s through the ingress**: an ingress ``Host: app.bench`` -> the bridge VM's port
  80 (busybox httpd), and N GET / requests at a fixed concurrency driven by an asyncio client
  in a thread that joined the server's namespace: once to Caddy's listen address
  (127.0.0.1:80 there) with that Host header, once straight to the VM's address. One
  connection per request both ways (busybox httpd closes after each answer), so the client
  does the same work on both sides and the difference is Caddy; and, for information, through
  Caddy with the client keeping its connections to Caddy (Caddy still opens one to the VM per
  request).
- **restore -> Running and fork -> Running with a network and without**, on the bridge server:
  a VM with ``network={"enabled": True}`` (a TAP unplugged at standby and replugged at
  restore; a fork gets its own address and TAP and is re-addressed by its agent before it is
  reported Running) against one with ``network={"enabled": False}`` (no NIC at all).
  Standby untimed, the restore call timed until it answers Running; a stored Standby snapshot
  of each, forked with ``target_state="Running"`` (the call timed; the fork deleted after).
  Where the difference goes: the steps each instance's operations log stamps (restore
  requested -> QEMU runs -> its agent answered -> a fork's identity set), and, by hand, the
  network package's ``create_tap`` (with a 1-vCPU VM's default limits) + ``open_tap``, what a
  restore does for its NIC before QEMU starts, timed in a second namespace of this bench's.

Aims (issue 14): through Caddy >= 0.8x the requests/s straight to the VM; restore and fork with a
network <= 1.1x without. TAP/user is reported, not judged. Every server, Caddy and QEMU started
here is ended by PID, and the namespace removed, also on failure. The load average and any
pytest seen running are printed at the start and the end: the figures are only as quiet as the
machine was (2 cores, TCG: a guest's own CPU bounds most of what is measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from bench.instances import (
    Server,
    kill_pids,
    median,
    qemu_pids,
    terminate_as_exit,
    timed,
)
from hypemand.images import demo
from hypemand.network import BandwidthLimits, NetworkConfig, NetworkHost
from hypemand.network.namespace import run_in_namespace

MB = 1_000_000
TRANSFER_TIMEOUT = 120.0
SHAPE: dict[str, Any] = {"size": "256MB", "overlay_size": "64MB", "vcpus": 1}
# busybox httpd in the background (the ingress's target), then an idle loop.
SERVES: dict[str, Any] = {"entrypoint": ["/bin/sh", "-c"],
                          "cmd": ["httpd -p 80 -h /www; while true; do sleep 3600; done"]}
IDLE: dict[str, Any] = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 3600; done"]}
UNCAPPED = {"bandwidth_download": "10Gbps", "bandwidth_upload": "10Gbps"}
INGRESS_HOST = "app.bench"
ZEROS = bytes(1 << 20)


@dataclass
class Params:
    runs: int = 5  # alternating transfer runs (each: download and upload, TAP and user mode)
    megabytes: int = 30
    load_runs: int = 7  # alternating load runs, Caddy and straight
    requests: int = 250
    concurrency: int = 8
    cycles: int = 9  # standby/restore cycles per VM
    forks: int = 7  # forks per snapshot


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return median(self.samples.get(key, []))

    def paired_diff(self, key: str, reference: str) -> float:
        """The median of the same-run differences key - reference."""
        pairs = zip(self.samples.get(key, []), self.samples.get(reference, []), strict=False)
        return median([a - b for a, b in pairs])

    def paired(self, key: str, reference: str) -> float:
        """The median of the same-run ratios key / reference."""
        pairs = zip(self.samples.get(key, []), self.samples.get(reference, []), strict=False)
        return median([a / b for a, b in pairs if b])


# ---- the namespace, the servers ------------------------------------------------------------------


@contextlib.contextmanager
def bench_namespace() -> Iterator[str]:
    """A network namespace of this bench's (loopback up), removed whatever happens."""
    name = f"hmb-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True,
                       timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=60)


def running(client: Hypeman, name: str, **spec: Any) -> tuple[str, str | None]:
    """A Running VM of the demo image: (id, its IP or None)."""
    created = client.instances.create(name=name, image=demo.DEMO_NAME, **{**SHAPE, **spec})
    waited = client.instances.wait(created.id, state="Running", api_timeout="180s")
    if waited.state != "Running":
        raise RuntimeError(f"{name} is {waited.state}, not Running: {waited.state_error}")
    network = client.instances.get(created.id).network
    return created.id, network.ip if network is not None else None


def guest_sh(client: Hypeman, instance: str, script: str) -> str:
    result = sdk_exec(client, instance, ["/bin/sh", "-c", script], timeout=int(TRANSFER_TIMEOUT) + 30)
    output = result.output.decode(errors="replace")
    if result.exit_code != 0:
        raise RuntimeError(f"guest command failed ({result.exit_code}): {script}\n{output}")
    return output


# ---- 1. throughput: TAP against user mode --------------------------------------------------------


@dataclass
class Side:
    """One VM and the host end it talks to."""

    label: str  # "tap" or "user"
    client: Hypeman
    instance: str
    namespace: str | None  # where the host end's sockets are made (None: the root namespace)
    bind: str  # the host end's address there
    reach: str  # that address as the guest reaches it


def host_listener(side: Side) -> socket.socket:
    def make() -> socket.socket:
        listener = socket.create_server((side.bind, 0))
        listener.settimeout(TRANSFER_TIMEOUT)
        return listener

    return run_in_namespace(side.namespace, make)


def serve_download(listener: socket.socket, size: int) -> float:
    """Accept one connection, send ``size`` zero bytes and end the sending half; seconds from the
    accept until the guest, having read to that end, closes."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(TRANSFER_TIMEOUT)
        started = time.monotonic()
        view, left = memoryview(ZEROS), size
        while left:
            step = min(left, len(ZEROS))
            conn.sendall(view[:step])
            left -= step
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
        return time.monotonic() - started


def serve_upload(listener: socket.socket, size: int) -> float:
    """Accept one connection and read it to its EOF; seconds from the accept to the EOF."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(TRANSFER_TIMEOUT)
        started = time.monotonic()
        buffer, received = bytearray(1 << 20), 0
        while count := conn.recv_into(buffer):
            received += count
        seconds = time.monotonic() - started
    if received != size:
        raise RuntimeError(f"received {received} bytes of {size}")
    return seconds


def transfer(side: Side, direction: str, size: int) -> float:
    """MB/s of one transfer of ``size`` bytes (direction "down": host -> guest, "up": guest ->
    host), timed at the host end. In the guest, ``nc -e`` hands the connection to dd as its
    stdin and stdout, so the guest moves 64 KiB per system call (busybox nc's own copy loop
    moves about 1 KiB and bounds a TCG guest at a few MB/s either way)."""
    with host_listener(side) as listener, ThreadPoolExecutor(1) as pool:
        port = listener.getsockname()[1]
        nc = f"timeout {int(TRANSFER_TIMEOUT)} nc {side.reach} {port} -e"
        if direction == "down":
            host_end = pool.submit(serve_download, listener, size)
            guest = f"{nc} dd of=/dev/null bs=65536"
        else:
            host_end = pool.submit(serve_upload, listener, size)
            blocks = size // 65536
            assert blocks * 65536 == size
            guest = f"{nc} dd if=/dev/zero bs=65536 count={blocks}"
        try:
            guest_sh(side.client, side.instance, guest)
        except BaseException:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the host end's accept
            raise
        seconds = host_end.result(timeout=TRANSFER_TIMEOUT)
    return size / MB / seconds


def throughput(tap: Side, user: Side, params: Params, res: Results) -> None:
    size = params.megabytes * MB // 65536 * 65536
    for side in (tap, user):  # untimed: a fresh guest's first nc and dd (TCG translates them)
        for direction in ("down", "up"):
            transfer(side, direction, 4 * 65536)
    for run in range(params.runs):
        for side in (tap, user) if run % 2 == 0 else (user, tap):
            for direction in ("down", "up"):
                res.add(f"{side.label}_{direction}", transfer(side, direction, size))
        print(f"  run {run + 1}/{params.runs}: MB/s down tap {res.samples['tap_down'][-1]:.1f} "
              f"user {res.samples['user_down'][-1]:.1f}; up tap {res.samples['tap_up'][-1]:.1f} "
              f"user {res.samples['user_up'][-1]:.1f}", flush=True)


# ---- 2. requests/s through Caddy against straight to the VM ---------------------------------------


async def drive(address: str, port: int, host: str, requests: int, concurrency: int,
                keep_alive: bool = False) -> tuple[float, int]:
    """``requests`` GET / at ``concurrency``: (seconds, failures). A connection per request, or
    (``keep_alive``) one per worker for as long as the server keeps it."""
    close = "" if keep_alive else "Connection: close\r\n"
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n{close}\r\n".encode()
    todo = iter(range(requests))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            for _ in todo:  # one iterator shared by the workers: each request taken once
                try:
                    if streams is None:
                        streams = await asyncio.wait_for(asyncio.open_connection(address, port), 10)
                    reader, writer = streams
                    writer.write(request)
                    if keep_alive:
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                        found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                        length = int(found[1]) if found else 0
                        answer = head + await asyncio.wait_for(reader.readexactly(length), 10)
                        if re.search(rb"(?im)^connection:\s*close", head):
                            writer.close()
                            streams = None
                    else:
                        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's close
                        writer.close()
                        streams = None
                    if answer.split(b" ", 2)[1:2] != [b"200"] or b"hypeman demo" not in answer:
                        failures += 1
                except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    failures += 1
                    if streams is not None:
                        streams[1].close()
                    streams = None
        finally:
            if streams is not None:
                streams[1].close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started, failures


def load(namespace: str, target: tuple[str, int, str, bool], requests: int, concurrency: int) -> float:
    """Requests/s to ``target`` (address, port, Host, keep-alive), driven from a thread in
    ``namespace``; refuses a run with failures."""
    address, port, host, keep_alive = target
    seconds, failures = run_in_namespace(
        namespace, lambda: asyncio.run(drive(address, port, host, requests, concurrency, keep_alive)))
    if failures:
        raise RuntimeError(f"{failures} of {requests} requests to {address}:{port} ({host}) failed")
    return requests / seconds


def ingress_load(client: Hypeman, namespace: str, instance: str, ip: str, params: Params,
                 res: Results) -> None:
    client.ingresses.create(name="bench", rules=[{
        "match": {"hostname": INGRESS_HOST, "port": 80}, "target": {"instance": instance, "port": 80},
    }])  # fmt: skip
    targets = {
        "caddy": ("127.0.0.1", 80, INGRESS_HOST, False),
        "straight": (ip, 80, ip, False),
        "caddy_keepalive": ("127.0.0.1", 80, INGRESS_HOST, True),
    }
    for target in targets.values():  # untimed: connections, DNS, TCG warm
        load(namespace, target, 4 * params.concurrency, params.concurrency)
    for run in range(params.load_runs):
        keys = list(targets) if run % 2 == 0 else list(reversed(targets))
        for key in keys:
            res.add(f"rps_{key}", load(namespace, targets[key], params.requests, params.concurrency))
        print(f"  run {run + 1}/{params.load_runs}: req/s through Caddy {res.samples['rps_caddy'][-1]:.0f}, "
              f"straight {res.samples['rps_straight'][-1]:.0f}, through Caddy with keep-alive "
              f"{res.samples['rps_caddy_keepalive'][-1]:.0f}", flush=True)


# ---- 3. restore and fork with a network and without ------------------------------------------------


# Steps of a restore (and a fork, which is one) in an instance's operations log, in order.
STEPS = (("restore requested", "start"), ("VMM pid", "vmm"), ("guest agent answered", "agent"),
         ("fork identity set", "identity"))


def restore_steps(client: Hypeman, instance: str) -> dict[str, float]:
    """Seconds from each step of the instance's last restore to the next, from its operations
    log (``logs?source=hypeman``, flushed for the reader; millisecond stamps): ``vmm`` (restore
    requested -> QEMU runs), ``agent`` (-> the agent answered, clock set), ``identity`` (-> a
    fork's identity set). Empty when the log does not say (its wording is not a contract)."""
    with contextlib.suppress(Exception):
        lines = list(client.instances.logs(instance, source="hypeman", tail=50))
        starts = [index for index, line in enumerate(lines) if "restore requested" in line]
        if not starts:
            return {}
        stamps: dict[str, float] = {}
        for line in lines[starts[-1]:]:
            stamp, _, message = line.partition(" ")
            for needle, key in STEPS:
                if needle in message and key not in stamps:
                    stamps[key] = datetime.fromisoformat(stamp).timestamp()
        steps, previous = {}, "start"
        for _, key in STEPS[1:]:
            if key in stamps and previous in stamps:
                steps[key] = stamps[key] - stamps[previous]
                previous = key
        return steps
    return {}


def restore_and_fork(client: Hypeman, params: Params, res: Results) -> None:
    guests = {"net": running(client, "with-net", network={"enabled": True}, **IDLE)[0],
              "nonet": running(client, "without-net", network={"enabled": False}, **IDLE)[0]}
    for key, instance in guests.items():
        network = client.instances.get(instance).network
        enabled = network is not None and network.enabled and network.ip is not None
        if enabled != (key == "net"):
            raise RuntimeError(f"{key}: network {network}")

    def restore(instance: str) -> float:
        if client.instances.standby(instance).state != "Standby":
            raise RuntimeError("standby did not answer Standby")
        seconds, answer = timed(lambda: client.instances.restore(instance))
        if answer.state != "Running":
            raise RuntimeError(f"restore answered {answer.state}")
        return float(seconds)

    for key in guests:  # untimed: a first cycle each
        restore(guests[key])
    for cycle in range(params.cycles):
        for key in ("net", "nonet") if cycle % 2 == 0 else ("nonet", "net"):
            res.add(f"restore_{key}", restore(guests[key]))
            for step, seconds in restore_steps(client, guests[key]).items():
                res.add(f"restore_{key}_{step}", seconds)
    print(f"  restore -> Running, {params.cycles} cycles: with network "
          f"{res.med('restore_net') * 1000:.0f} ms, without {res.med('restore_nonet') * 1000:.0f} ms "
          "(medians)", flush=True)

    snapshots = {key: client.instances.snapshots.create(instance, kind="Standby", name=f"snap-{key}").id
                 for key, instance in guests.items()}
    names = iter(range(10_000))

    def fork(key: str, record: bool = True) -> None:
        name = f"fork-{key}-{next(names)}"
        seconds, made = timed(
            lambda: client.snapshots.fork(snapshots[key], name=name, target_state="Running"))
        try:
            if made.state != "Running":
                raise RuntimeError(f"fork {name} answered {made.state}")
            has_ip = made.network is not None and made.network.ip is not None
            if has_ip != (key == "net"):
                raise RuntimeError(f"fork {name}: network {made.network}")
            if record:
                res.add(f"fork_{key}", seconds)
                for step, step_seconds in restore_steps(client, made.id).items():
                    res.add(f"fork_{key}_{step}", step_seconds)
        finally:
            client.instances.delete(made.id)

    for key in snapshots:  # untimed: a first fork each
        fork(key, record=False)
    for run in range(params.forks):
        for key in ("net", "nonet") if run % 2 == 0 else ("nonet", "net"):
            fork(key)
    print(f"  fork -> Running, {params.forks} each: with network {res.med('fork_net') * 1000:.0f} ms, "
          f"without {res.med('fork_nonet') * 1000:.0f} ms (medians)", flush=True)
    for instance in guests.values():
        client.instances.delete(instance)
    for snapshot in snapshots.values():
        client.snapshots.delete(snapshot)


async def tap_plumbing(namespace: str, runs: int) -> list[float]:
    """By hand, with the network package the server uses, in a namespace of its own: seconds
    of ``create_tap`` (with a 1-vCPU VM's default limits) + ``open_tap``, what a restore does
    for its NIC before QEMU starts; the TAP deleted again after each (what standby does)."""
    # Its warning that this namespace has no uplink is the point: the probe needs none.
    logging.getLogger("hypemand.network.host").setLevel(logging.ERROR)
    host = NetworkHost(NetworkConfig.parse(namespace=namespace))
    try:
        await host.start(set())
        share = host.capacity // 2  # a 1-vCPU VM's share on 2 cores: the server's default
        limits = BandwidthLimits(download=share, upload=share)
        address, vm_id = IPv4Address("10.100.7.9"), "b" * 26
        seconds = []
        for _ in range(runs + 1):
            started = time.monotonic()
            await host.create_tap(vm_id, address, limits)
            fd = await host.open_tap(vm_id)
            seconds.append(time.monotonic() - started)
            os.close(fd)
            await host.delete_tap(vm_id)
        return seconds[1:]  # the first one warms the namespace thread
    finally:
        host.close()


# ---- the run ---------------------------------------------------------------------------------------


def machine_state() -> str:
    load_avg = " ".join(f"{value:.2f}" for value in os.getloadavg())
    tests = subprocess.run(["pgrep", "-c", "-f", "pytest"], capture_output=True, text=True).stdout
    return f"load average {load_avg} ({os.cpu_count()} cores), pytest processes running: {tests.strip() or 0}"


def record(servers: list[Server], server: Server) -> Server:
    servers.append(server)
    return server


def in_parallel(*actions: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(actions)) as pool:
        return [future.result() for future in [pool.submit(action) for action in actions]]


def run(where: Path, params: Params, res: Results) -> None:
    servers: list[Server] = []
    try:
        with bench_namespace() as namespace:
            try:
                print(f"servers: bridge in namespace {namespace}, and user mode ...", flush=True)
                # Each start ends its own server if it fails; one that started is recorded at once.
                bridge_server, user_server = in_parallel(
                    lambda: record(servers, Server.start(where / "bridge", where / "bridge.log", namespace)),
                    lambda: record(servers, Server.start(where / "user", where / "user.log")))
                in_parallel(bridge_server.install_demo, user_server.install_demo)
                with bridge_server.client() as bridge, user_server.client() as user:
                    models = (bridge.capabilities.get().network, user.capabilities.get().network)
                    if (models[0].model, models[1].model) != ("bridge", "nat"):
                        raise RuntimeError(f"network models {models[0].model}, {models[1].model}")
                    (tap_vm, tap_ip), (user_vm, _) = in_parallel(
                        lambda: running(bridge, "tput-tap", network=UNCAPPED, **SERVES),
                        lambda: running(user, "tput-user", **SERVES))
                    assert tap_ip is not None and models[0].gateway is not None
                    tap = Side("tap", bridge, tap_vm, namespace, "0.0.0.0", models[0].gateway)
                    usermode = Side("user", user, user_vm, None, "127.0.0.1", "10.0.2.2")
                    print(f"1. throughput, {params.megabytes} MB per transfer, TAP ({tap_ip}) vs user mode",
                          flush=True)
                    throughput(tap, usermode, params, res)
                    user_server.shutdown()  # its VM costs CPU from here on
                    print(f"2. requests/s, {params.requests} requests at concurrency {params.concurrency}, "
                          "through Caddy vs straight", flush=True)
                    ingress_load(bridge, namespace, "tput-tap", tap_ip, params, res)
                    bridge.instances.delete(tap_vm)
                    print("3. restore and fork with a network vs without", flush=True)
                    restore_and_fork(bridge, params, res)
                with bench_namespace() as probe:
                    for seconds in asyncio.run(tap_plumbing(probe, params.cycles)):
                        res.add("tap_plumbing", seconds)
            finally:
                for server in servers:
                    server.shutdown()  # deletes its VMs, stops it (and its Caddy), ends QEMUs by PID
                kill_pids(qemu_pids(where))  # anything of ours left, before its namespace goes
    finally:
        kill_pids(qemu_pids(where))


def report(res: Results, params: Params) -> list[tuple[str, bool, str]]:
    def row(title: str, value: str) -> None:
        print(f"  {title:46} {value}")

    print(f"\n=== network, medians of alternating runs: {params.runs} transfers of {params.megabytes} MB "
          f"each way, {params.load_runs} load runs of {params.requests} requests, {params.cycles} "
          f"restores, {params.forks} forks ===")
    checks: list[tuple[str, bool, str]] = []
    if res.samples.get("tap_up"):
        for direction, what in (("down", "host -> guest (guest pulls), MB/s"),
                                ("up", "guest -> host, MB/s")):
            tap, user = res.med(f"tap_{direction}"), res.med(f"user_{direction}")
            row(what, "")
            row("  TAP (bridge)", f"{tap:8.1f}")
            row("  user mode (slirp)", f"{user:8.1f}")
            row("  TAP / user (of medians / paired)",
                f"{tap / user:8.2f} / {res.paired(f'tap_{direction}', f'user_{direction}'):.2f}")
    if res.samples.get("rps_straight"):
        caddy, straight = res.med("rps_caddy"), res.med("rps_straight")
        row(f"GET / at concurrency {params.concurrency}, req/s", "")
        row("  through Caddy (ingress, Host header)", f"{caddy:8.0f}")
        row("  straight to the VM's address", f"{straight:8.0f}")
        ratio = caddy / straight
        row("  Caddy / straight (of medians / paired)",
            f"{ratio:8.2f} / {res.paired('rps_caddy', 'rps_straight'):.2f}")
        keepalive = res.med("rps_caddy_keepalive")
        row("  through Caddy, client keep-alive", f"{keepalive:8.0f}")
        row("  that / straight (of medians / paired)",
            f"{keepalive / straight:8.2f} / {res.paired('rps_caddy_keepalive', 'rps_straight'):.2f}")
        checks.append(("requests/s through Caddy >= 0.8x straight", ratio >= 0.8, f"{ratio:.2f}x"))
    for key, what in (("restore", "restore -> Running"), ("fork", "fork -> Running")):
        if not res.samples.get(f"{key}_nonet"):
            continue
        net, nonet = res.med(f"{key}_net"), res.med(f"{key}_nonet")
        row(f"{what}, ms", "")
        row("  with a network (TAP)", f"{net * 1000:8.0f}")
        row("  without (no NIC)", f"{nonet * 1000:8.0f}")
        ratio = net / nonet
        row("  with / without (of medians / paired)",
            f"{ratio:8.2f} / {res.paired(f'{key}_net', f'{key}_nonet'):.2f}")
        row("  with - without (paired), ms", f"{res.paired_diff(f'{key}_net', f'{key}_nonet') * 1000:8.0f}")
        steps = [step for _, step in STEPS[1:] if res.samples.get(f"{key}_net_{step}")]
        if steps:
            row(f"  steps from the operations log: {' / '.join(steps)}", "")
            for who, label in (("net", "with"), ("nonet", "without")):
                row(f"    {label}, ms", " /".join(f"{res.med(f'{key}_{who}_{step}') * 1000:4.0f}"
                                                for step in steps))
        checks.append((f"{what} with a network <= 1.1x without", ratio <= 1.1, f"{ratio:.2f}x"))
    if res.samples.get("tap_plumbing"):
        row("by hand: create_tap + open_tap (a restore's NIC), ms", f"{res.med('tap_plumbing') * 1000:8.1f}")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 runs of everything, 10 MB, 100 requests")
    parser.add_argument("--runs", type=int, help="alternating transfer and load runs (default 5 and 7)")
    parser.add_argument("--mb", type=int, help="megabytes per transfer (default 30)")
    parser.add_argument("--requests", type=int, help="requests per load run (default 250)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    parser.add_argument("--cycles", type=int, help="standby/restore cycles per VM (default 9)")
    parser.add_argument("--forks", type=int, help="forks per snapshot (default 7)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.network needs root: it makes a network namespace for the bridge")
    params = Params()
    if args.quick:
        params = Params(runs=2, megabytes=10, load_runs=2, requests=100, cycles=3, forks=2)
    if args.runs:
        params.runs = params.load_runs = args.runs
    params.megabytes = args.mb or params.megabytes
    params.requests = args.requests or params.requests
    params.concurrency = args.concurrency or params.concurrency
    params.cycles = args.cycles or params.cycles
    params.forks = args.forks or params.forks
    started = time.monotonic()
    at_start = machine_state()
    print(f"at start: {at_start}", flush=True)
    res = Results()
    try:
        with terminate_as_exit(), tempfile.TemporaryDirectory(prefix="hm-bench-network-") as tmp:
            run(Path(tmp), params, res)
    finally:
        checks = report(res, params)
        print(f"\n=== targets (issue 14) === total run time {time.monotonic() - started:.0f} s; "
              f"at start: {at_start}; at end: {machine_state()}")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:52} {detail}")
        print("command line:", shlex.join([".venv/bin/python", "-m", "bench.network", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
