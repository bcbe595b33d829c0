"""What auto-standby's reading of connection tracking costs.

    .venv/bin/python -m bench.autostandby [--inbound 0,100,1000] [--unrelated 20000] [--vms 100]
                                          [--reads 10]

In a network namespace this bench makes (``hmb-<random>``, removed at the end; nothing touches
the root namespace), established TCP entries are put into its conntrack table through
ctnetlink: first ``--unrelated`` flows the watched VMs do not answer (their own outbound
connections, through NAT), then, step by step, ``--inbound`` flows to the ``--vms`` watched VMs'
port 80, from many clients. At each step, medians of ``--reads``:

- **read**: one ``FlowReader.inbound_tcp_flows()`` for the watched VMs (one kernel-filtered
  dump per VM through pyroute2, in the reader's namespace thread), wall time and the server
  process's CPU time;
- **pass**: what the controller then does on the event loop (``InboundFilter.inbound`` and
  ``IdleCountdown.observe`` per VM).

The controller reads once a second, so read + pass is the share of one core auto-standby takes.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import time
from datetime import UTC, datetime
from ipaddress import IPv4Address

from hypemand.network.conntrack import FlowReader
from hypemand.network.namespace import ensure_namespace, run_in_namespace
from hypemand.policies.activity import IdleCountdown, InboundFilter
from hypemand.policies.models import AutoStandbyPolicy


def fill(namespace: str, first: int, entries: int, vms: int, *, inbound: bool) -> None:
    """Blocking: ``entries`` more ESTABLISHED TCP flows (numbered from ``first``), to the VMs'
    port 80 (``inbound``) or from the VMs out to the world through NAT."""

    def add() -> None:
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        established = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [["CTA_PROTOINFO_TCP_STATE", 3]]}]]}
        with Conntrack() as conntrack:
            for n in range(first, first + entries):
                vm = f"10.100.{(n % vms) // 250}.{(n % vms) % 250 + 2}"
                remote = f"198.51.{(n // 60000) % 256}.{(n // 250) % 250 + 1}"
                port = 1024 + n % 60000
                if inbound:
                    original = NFCTAttrTuple(saddr=remote, daddr=vm, proto=6, sport=port, dport=80)
                    reply = NFCTAttrTuple(saddr=vm, daddr=remote, proto=6, sport=80, dport=port)
                else:  # masqueraded out of the uplink (192.0.2.2)
                    original = NFCTAttrTuple(saddr=vm, daddr=remote, proto=6, sport=port, dport=443)
                    reply = NFCTAttrTuple(saddr=remote, daddr="192.0.2.2", proto=6, sport=443, dport=port)
                conntrack.entry("add", timeout=600, protoinfo=established, tuple_orig=original,
                                tuple_reply=reply)

    run_in_namespace(namespace, add)


async def measure(namespace: str, vms: int, reads: int) -> tuple[float, float, float, int]:
    reader = FlowReader(namespace)
    policy = AutoStandbyPolicy(enabled=True, idle_timeout="5m")
    addresses = [f"10.100.{n // 250}.{n % 250 + 2}" for n in range(vms)]
    servers = [IPv4Address(address) for address in addresses]
    filters = [InboundFilter.of(address, policy) for address in addresses]
    countdowns = [IdleCountdown() for _ in addresses]
    walls, cpus, passes = [], [], []
    count = 0
    try:
        for _ in range(reads):
            wall, cpu = time.perf_counter(), time.process_time()
            flows = await reader.inbound_tcp_flows(servers)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            count = sum(len(found) for found in flows.values())
            started = time.perf_counter()
            now = datetime.now(UTC)
            for server, chosen, countdown in zip(servers, filters, countdowns, strict=True):
                countdown.observe(chosen.inbound(flows.get(server, [])), now)
            passes.append(time.perf_counter() - started)
    finally:
        reader.close()
    return statistics.median(walls), statistics.median(cpus), statistics.median(passes), count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inbound", default="0,100,1000")
    parser.add_argument("--unrelated", type=int, default=20000)
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--reads", type=int, default=10)
    args = parser.parse_args()
    namespace = f"hmb-{secrets.token_hex(4)}"
    ensure_namespace(namespace)
    try:
        fill(namespace, 0, args.unrelated, args.vms, inbound=False)
        header = f"{'inbound':>8} {'read ms':>9} {'read CPU ms':>12} {'pass ms':>8}"
        print(f"{header}   ({args.vms} VMs watched, {args.unrelated} unrelated flows, "
              f"median of {args.reads})")
        filled = 0
        for size in sorted(int(s) for s in args.inbound.split(",")):
            if size > filled:
                fill(namespace, filled, size - filled, args.vms, inbound=True)
                filled = size
            wall, cpu, passed, seen = asyncio.run(measure(namespace, args.vms, args.reads))
            print(f"{seen:>8} {wall * 1000:>9.1f} {cpu * 1000:>12.1f} {passed * 1000:>8.2f}")
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    main()
