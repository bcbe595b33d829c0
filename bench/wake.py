"""Wake on traffic: time to first byte through the ingress to a VM in Standby, against the same
request to the VM Running, and against an explicit restore followed by the request.

    .venv/bin/python -m bench.wake [--rounds N] [--burst N] [--settle S]

One real ``hypemand serve`` with its VM network in a namespace this bench makes (``hmb-<random>``,
removed at the end: nothing lands in the root namespace), the busybox demo image pushed into it,
one VM (256 MiB, 1 vCPU, the demo's httpd on port 80) behind an ingress ``wake.bench``. The
client is a thread that joined the namespace: it connects to Caddy (127.0.0.1:80 there), sends
``GET /`` with that Host and times from the connect to the first byte of the answer (then reads
the page, which must be busybox's). Each round, in an order that alternates between rounds:

- **running**: the request to the Running VM;
- **wake**: standby (untimed), ``--settle`` seconds (default 1.5: longer than Caddy's 1 s cache
  of the address, as for any VM that has slept a while), then the request; the VM answers once
  the server has restored it;
- **restore + request**: standby, the same pause, then ``restore`` through the API (the official
  SDK, strict) timed until it answers Running, then the request; both timed together, and the
  restore alone.

Then once, **a burst**: standby, the pause, ``--burst`` concurrent requests (default 8): all must
get the page, the slowest and median first bytes are reported, and the restores counted from
the instance's operations log (one expected). The server's own figure for each wake
("woke in N ms", the restore as the waker saw it) is read from its log.

Aim (issue 16): the wake's first byte no later than the explicit restore + request plus 50 ms
(medians; the same-round difference is printed too). Every server, Caddy and QEMU started here
is ended by PID, and the namespace removed, also on failure. The load average and any pytest
seen running are printed at the start and the end: 2 cores, TCG, a machine shared with tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hypeman import Hypeman

from bench.instances import Server, kill_pids, median, qemu_pids, terminate_as_exit
from bench.network import bench_namespace, machine_state
from hypemand.images import demo
from hypemand.network.namespace import run_in_namespace

SHAPE: dict[str, Any] = {"size": "256MB", "overlay_size": "64MB", "vcpus": 1}
HOST = "wake.bench"
PAGE = b"busybox httpd"
CLIENT_TIMEOUT = 120.0
AIM_MS = 50.0
WOKE = re.compile(r"instance (\w+) woke in (\d+) ms")


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return median(self.values.get(key, []))

    def paired(self, key: str, reference: str, ratio: bool) -> float:
        pairs = zip(self.values.get(key, []), self.values.get(reference, []), strict=False)
        return median([a / b if ratio else a - b for a, b in pairs if b or not ratio])


def first_byte(namespace: str, at: list[float] | None = None) -> float:
    """Seconds from the connect to Caddy to the first byte of its answer; the page is checked.
    ``at`` gets the wall-clock times of the connect and of the first byte."""

    def go() -> float:
        if at is not None:
            at.append(time.time())
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", 80), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            answer = sock.recv(65536)
            elapsed = time.monotonic() - started
            if at is not None:
                at.append(time.time())
            while chunk := sock.recv(65536):
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200") or PAGE not in answer:
            raise RuntimeError(f"not the page: {answer[:300]!r}")
        return elapsed

    return run_in_namespace(namespace, go)


def standby(client: Hypeman, instance: str, settle: float) -> None:
    if client.instances.standby(instance).state != "Standby":
        raise RuntimeError("standby did not answer Standby")
    time.sleep(settle)


def running_again(client: Hypeman, instance: str) -> None:
    """Answered means the guest runs; the restore's bookkeeping may end a moment later."""
    if client.instances.wait(instance, state="Running", api_timeout="120s").state != "Running":
        raise RuntimeError("the woken VM is not Running")


STEPS = (("requested", "restore requested"), ("vmm", "restore: VMM pid"),
         ("agent", "restore: guest agent answered"))


def wake_steps(client: Hypeman, instance: str, at: list[float], samples: Samples) -> None:
    """Where a wake's time went, from the last restore's lines in the operations log (UTC,
    milliseconds) against the client's clock: the request to the restore's start, to QEMU
    running the guest again (its address was let through as QEMU got its TAP), to the first
    byte, and when the agent answered (the restore call's own end, about)."""
    stamps: dict[str, float] = {}
    for line in client.instances.logs(instance, source="hypeman", tail=50):
        for key, text in STEPS:
            if text in line:
                stamps[key] = datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()
    if len(stamps) != len(STEPS):
        return
    start, first = at
    samples.add("step_trigger", stamps["requested"] - start)
    samples.add("step_qemu", stamps["vmm"] - stamps["requested"])
    samples.add("step_answer", first - stamps["vmm"])
    samples.add("step_agent", stamps["agent"] - stamps["vmm"])


def restores(client: Hypeman, instance: str) -> int:
    lines = client.instances.logs(instance, source="hypeman", tail=2000)
    return sum("restore requested" in line for line in lines)


def round_of(client: Hypeman, namespace: str, instance: str, settle: float, order: list[str],
             samples: Samples) -> None:
    for kind in order:
        if kind == "running":
            samples.add("running", first_byte(namespace))
        elif kind == "wake":
            standby(client, instance, settle)
            at: list[float] = []
            samples.add("wake", first_byte(namespace, at))
            running_again(client, instance)
            wake_steps(client, instance, at, samples)
        else:
            standby(client, instance, settle)
            started = time.monotonic()
            if client.instances.restore(instance).state != "Running":
                raise RuntimeError("restore did not answer Running")
            restored = time.monotonic() - started
            request = first_byte(namespace)
            samples.add("restore", restored)
            samples.add("after_restore", request)
            samples.add("restore_request", restored + request)


def burst(client: Hypeman, namespace: str, instance: str, settle: float, size: int,
          samples: Samples) -> int:
    standby(client, instance, settle)
    before = restores(client, instance)
    with ThreadPoolExecutor(size) as pool:
        for seconds in pool.map(lambda _: first_byte(namespace), range(size)):
            samples.add("burst", seconds)
    running_again(client, instance)
    return restores(client, instance) - before


def run(where: Path, rounds: int, burst_size: int, settle: float, samples: Samples) -> int:
    server: Server | None = None
    try:
        with bench_namespace() as namespace:
            try:
                print(f"server: bridge in namespace {namespace} ...", flush=True)
                server = Server.start(where / "data", where / "server.log", namespace)
                server.install_demo()
                with server.client() as client:
                    created = client.instances.create(name="wake", image=demo.DEMO_NAME, **SHAPE)
                    running_again(client, created.id)
                    client.ingresses.create(name="wake", rules=[
                        {"match": {"hostname": HOST}, "target": {"instance": "wake", "port": 80}}])
                    deadline = time.monotonic() + 60
                    while True:  # the guest's httpd listens some time after Running
                        try:
                            first_byte(namespace)
                            break
                        except (OSError, RuntimeError):
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.2)
                    kinds = ["running", "wake", "restore_request"]
                    for index in range(rounds):
                        order = kinds if index % 2 == 0 else kinds[::-1]
                        round_of(client, namespace, created.id, settle, order, samples)
                        print(f"  round {index + 1}/{rounds}: " + ", ".join(
                            f"{kind} {samples.values[kind][-1] * 1000:.0f} ms" for kind in kinds), flush=True)
                    woken = burst(client, namespace, created.id, settle, burst_size, samples)
                    for match in WOKE.finditer(server.log_path.read_text(errors="replace")):
                        samples.add("server_wake", int(match.group(2)) / 1000)
                    return woken
            finally:
                if server is not None:
                    server.shutdown()  # deletes its VM, stops it (and its Caddy), ends QEMUs by PID
                kill_pids(qemu_pids(where))
    finally:
        kill_pids(qemu_pids(where))


def report(samples: Samples, rounds: int, burst_size: int, woken: int | None) -> list[tuple[str, bool, str]]:
    def row(title: str, value: str) -> None:
        print(f"  {title:58} {value}")

    def ms(key: str) -> str:
        return f"{samples.med(key) * 1000:8.0f}"

    print(f"\n=== wake on traffic: time to first byte through the ingress, medians of {rounds} rounds ===")
    checks: list[tuple[str, bool, str]] = []
    if not samples.values.get("restore_request"):
        return checks
    row("to the Running VM, ms", ms("running"))
    row("to the VM in Standby (wake), ms", ms("wake"))
    row("explicit restore (API, until Running) + the request, ms", ms("restore_request"))
    row("  of which the restore call, ms", ms("restore"))
    row("  and the request, the guest's first since its restore, ms", ms("after_restore"))
    row("the server's own wake (restore as the waker saw it), ms", ms("server_wake"))
    if samples.values.get("step_qemu"):
        row("a wake's steps (operations log vs the client's clock), ms", "")
        row("  request -> restore requested", ms("step_trigger"))
        row("  restore requested -> QEMU runs the guest", ms("step_qemu"))
        row("  QEMU runs the guest -> first byte", ms("step_answer"))
        row("  (QEMU runs the guest -> its agent answered)", ms("step_agent"))
    row("wake / running (of medians / same round)",
        f"{samples.med('wake') / samples.med('running'):8.1f} / "
        f"{samples.paired('wake', 'running', True):.1f}")
    row("wake / (restore + request) (of medians / same round)",
        f"{samples.med('wake') / samples.med('restore_request'):8.2f} / "
        f"{samples.paired('wake', 'restore_request', True):.2f}")
    added = (samples.med("wake") - samples.med("restore_request")) * 1000
    row("wake - (restore + request), ms (of medians / same round)",
        f"{added:8.0f} / {samples.paired('wake', 'restore_request', False) * 1000:.0f}")
    if samples.values.get("burst"):
        row(f"burst of {burst_size} to the VM in Standby: median / slowest first byte, ms",
            f"{samples.med('burst') * 1000:8.0f} / {max(samples.values['burst']) * 1000:.0f}")
        row("  restores it caused", f"{woken:8d}")
        checks.append((f"a burst of {burst_size} restores once", woken == 1, f"{woken} restores"))
    checks.append((f"wake <= restore + request + {AIM_MS:.0f} ms", added <= AIM_MS, f"{added:+.0f} ms"))
    # Read literally, "wake adds no more than the restore itself plus 50 ms": (wake - running) -
    # restore. The guest's first request after any restore is slower than one to a warm guest
    # (the line above): the explicit restore pays it too, so it is printed beside it.
    literal = (samples.med("wake") - samples.med("running") - samples.med("restore")) * 1000
    explicit = (samples.med("restore_request") - samples.med("running") - samples.med("restore")) * 1000
    checks.append((f"wake - running <= restore + {AIM_MS:.0f} ms", literal <= AIM_MS,
                   f"{literal:+.0f} ms (explicit restore + request: {explicit:+.0f} ms)"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the three requests (default 7)")
    parser.add_argument("--burst", type=int, default=8, help="concurrent requests of the burst (default 8)")
    parser.add_argument("--settle", type=float, default=1.5, help="seconds asleep before each request")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.wake needs root: it makes a network namespace for the bridge")
    started = time.monotonic()
    at_start = machine_state()
    print(f"at start: {at_start}", flush=True)
    samples = Samples()
    woken: int | None = None
    try:
        with terminate_as_exit(), tempfile.TemporaryDirectory(prefix="hm-bench-wake-") as tmp:
            woken = run(Path(tmp), args.rounds, args.burst, args.settle, samples)
    finally:
        checks = report(samples, args.rounds, args.burst, woken)
        print(f"\n=== targets (issue 16) === total run time {time.monotonic() - started:.0f} s; "
              f"at start: {at_start}; at end: {machine_state()}")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:52} {detail}")
        print("command line:", shlex.join([".venv/bin/python", "-m", "bench.wake", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
