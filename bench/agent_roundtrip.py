"""Guest-agent latency and throughput, in host mode (agent on the host behind a pty relay) and in
a real TCG guest (virtio-serial):

    .venv/bin/python -m bench.agent_roundtrip [--runs 30] [--no-vm]

Prints medians of: ping round trip, exec of a no-op (`true`: start, exit, EXIT frame), and the
throughput of a 16 MiB put and get.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.guest.hostmode import HostAgent
from tests.support.guest import make_busybox_tree, make_ext4_image

from hypemand.guest.build import build_guest_binary
from hypemand.guest.client import AgentClient, GetEntry
from hypemand.guest.config_disk import GuestConfig, make_overlay_disk, write_config_disk
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.hypervisor.base import DiskConfig, VMConfig
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.layout import SystemPaths
from hypemand.system.files import ensure_system_files


async def _median_ms(runs: int, op: Callable[[], Awaitable[object]]) -> float:
    await op()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def measure(label: str, client: AgentClient, runs: int, scratch: str) -> None:
    ping = await _median_ms(runs, client.ping)
    noop = await _median_ms(runs, lambda: client.run(["true"]))
    data = os.urandom(16 << 20)
    path = f"{scratch}/bench.bin"
    start = time.perf_counter()
    await client.put_file(path, data)
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    total = 0
    async for item in client.get(path):
        assert isinstance(item, GetEntry)
        total += len(await item.read_all())
    get_s = time.perf_counter() - start
    assert total == len(data)
    await client.run(["rm", "-f", path])
    print(
        f"{label:10s} ping {ping:6.2f} ms | exec no-op {noop:6.2f} ms | "
        f"put {len(data) / put_s / 1e6:6.1f} MB/s | get {len(data) / get_s / 1e6:6.1f} MB/s"
    )


async def host_mode(runs: int, work: Path) -> None:
    binary = await asyncio.to_thread(build_guest_binary, SystemPaths(work / "system"))
    agent = HostAgent(binary, work / "agent.sock")
    await agent.start()
    try:
        client = await AgentClient.connect(agent.socket_path)
        try:
            await measure("host-mode", client, runs, str(work))
        finally:
            await client.close()
    finally:
        await agent.stop()


async def vm_mode(runs: int, work: Path) -> None:
    system_dir = Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system"))
    files = await asyncio.to_thread(ensure_system_files, system_dir)
    root = make_ext4_image(make_busybox_tree(work / "tree"), work / "root.ext4")
    make_overlay_disk(work / "overlay.raw", 96 << 20)
    write_config_disk(work / "config.raw", GuestConfig(cmd=["/bin/sleep", "100000"]))
    config = VMConfig(
        vm_id="agent-bench",
        directory=work / "vm",
        memory_mib=256,
        kernel=files.kernel_path,
        initrd=files.initrd_path,
        disks=[
            DiskConfig(path=root, readonly=True, serial="hm-root"),
            DiskConfig(path=work / "overlay.raw", serial="hm-overlay"),
            DiskConfig(path=work / "config.raw", readonly=True, serial="hm-config"),
        ],
    )
    handle = await QemuHypervisor(state_dir=work / "hv").start(config)
    try:
        await wait_for_markers(handle.console_log_path, [Marker.AGENT_READY], 180, handle.is_alive)
        start = time.perf_counter()
        client = await AgentClient.connect(handle.agent_socket_path, timeout=60)
        print(f"vm         connect+HELLO {(time.perf_counter() - start) * 1000:.1f} ms")
        try:
            await measure("vm (TCG)", client, runs, "/tmp")
        finally:
            await client.close()
    finally:
        if handle.is_alive():
            await handle.kill()
        await handle.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-vm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        await host_mode(args.runs, Path(tmp) / "host")
        if not args.no_vm:
            await vm_mode(args.runs, Path(tmp) / "vm")


if __name__ == "__main__":
    asyncio.run(main())
