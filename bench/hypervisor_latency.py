"""Boot and control latencies of the QEMU backend (TCG on these hosts).

Run: .venv/bin/python -m bench.hypervisor_latency [runs]   (from the repo root)
Boots the real system files (shared system dir) with a busybox ext4 root whose program sleeps;
"guest READY" is the init's HYPEMAN-AGENT-READY + PROGRAM-START markers.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.support.guest import (
    guest_spec,
    make_busybox_tree,
    make_ext4_image,
    prepared_vm_config,
    shared_system_dir,
)

from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.hypervisor.base import Board
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.system.files import SystemFiles, ensure_system_files


async def one_run(
    hypervisor: QemuHypervisor, system: SystemFiles, root: Path, board: Board, directory: Path
) -> dict[str, float]:
    program = GuestConfig(cmd=["/bin/sleep", "100000"])
    config = prepared_vm_config(system, guest_spec(directory, root, program, board=board))
    times: dict[str, float] = {}
    started = time.monotonic()
    vm = await hypervisor.start(config)
    times["start->QMP answering"] = time.monotonic() - started
    try:
        ready = [Marker.AGENT_READY, Marker.PROGRAM_START]
        await wait_for_markers(vm.console_log_path, ready, 120, vm.is_alive)
        times["start->guest READY"] = time.monotonic() - started
        for name, action in (("status", vm.status), ("pause", vm.pause), ("resume", vm.resume)):
            t = time.monotonic()
            await action()
            times[name] = time.monotonic() - t
        await vm.close()
        t = time.monotonic()
        adopted = await hypervisor.adopt(directory)
        assert adopted is not None
        times["adopt (incl. QMP connect)"] = time.monotonic() - t
        t = time.monotonic()
        outcome = await adopted.shutdown(timeout=30)
        times[f"shutdown ({outcome.value})"] = time.monotonic() - t
        await adopted.close()
    finally:
        if vm.is_alive():
            await vm.kill()
    return times


async def main(runs: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="hm-bench-"))
    hypervisor = QemuHypervisor(state_dir=scratch)
    await hypervisor.acceleration()
    system = await asyncio.to_thread(ensure_system_files, shared_system_dir())
    root = make_ext4_image(make_busybox_tree(scratch / "tree"), scratch / "root.ext4")
    for board in (Board.QEMU_MICROVM, Board.QEMU):
        results: dict[str, list[float]] = {}
        for index in range(runs):
            with tempfile.TemporaryDirectory(prefix="hm-bench-vm-") as tmp:
                times = await one_run(hypervisor, system, root, board, Path(tmp) / f"vm{index}")
                for key, value in times.items():
                    results.setdefault(key, []).append(value)
        print(f"\n{board.value} ({runs} runs): median [min..max] seconds")
        for key, values in results.items():
            print(f"  {key:28s} {statistics.median(values):8.4f}  [{min(values):.4f}..{max(values):.4f}]")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
