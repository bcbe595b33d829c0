"""Boot and control latencies of the QEMU backend (TCG on these hosts).

Run: .venv/bin/python -m bench.hypervisor_latency [runs]   (from the repo root)
Uses the hypervisor tests' busybox guest (cached under /var/tmp/hypemand-test-kernel).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.hypervisor.guest_image import READY_LINE, ensure_test_guest

from hypemand.hypervisor.base import Board, VMConfig
from hypemand.hypervisor.qemu import QemuHypervisor


async def one_run(hypervisor: QemuHypervisor, board: Board, directory: Path) -> dict[str, float]:
    guest = ensure_test_guest()
    config = VMConfig(
        vm_id="bench", directory=directory, board=board, kernel=guest.kernel, initrd=guest.initrd
    )
    times: dict[str, float] = {}
    started = time.monotonic()
    vm = await hypervisor.start(config)
    times["start->QMP answering"] = time.monotonic() - started
    try:
        while READY_LINE not in vm.console_log_path.read_text(errors="replace"):  # noqa: ASYNC110 - polls a file
            await asyncio.sleep(0.02)
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
    hypervisor = QemuHypervisor(state_dir=Path(tempfile.mkdtemp(prefix="hm-bench-")))
    await hypervisor.acceleration()
    for board in (Board.QEMU_MICROVM, Board.QEMU):
        results: dict[str, list[float]] = {}
        for index in range(runs):
            with tempfile.TemporaryDirectory(prefix="hm-bench-vm-") as tmp:
                for key, value in (await one_run(hypervisor, board, Path(tmp) / f"vm{index}")).items():
                    results.setdefault(key, []).append(value)
        print(f"\n{board.value} ({runs} runs): median [min..max] seconds")
        for key, values in results.items():
            print(f"  {key:28s} {statistics.median(values):8.4f}  [{min(values):.4f}..{max(values):.4f}]")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
