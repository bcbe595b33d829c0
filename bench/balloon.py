"""The memory balloon: how much host memory a reclaim really gives back, and what the device costs.

Run: .venv/bin/python -m bench.balloon [runs] [--only reclaim|boot]   (from the repo root)

reclaim: a 1 GiB microvm guest dirties 640 MiB (a file in its /dev/shm, then removed: free in
  the guest, still resident on the host), then its balloon is inflated by 256 MiB, once through
  the handle (``set_guest_memory_target``, what the reclaim route does) and once by QMP
  ``balloon`` typed by hand, alternating. Measured before and after the guest's balloon settled:
  the RAM file's data (SEEK_DATA) and page-cache residency (fincore), QEMU's RSS, and the host's
  MemAvailable. "Returned per GiB ballooned" = drop of each / balloon size.
boot: boot to the program's start and restore (standby, then restore to ``cont``), with and
  without the balloon device, alternating: the device's cost (ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.support.guest import (
    guest_spec,
    make_busybox_tree,
    make_ext4_image,
    prepared_vm_config,
    shared_system_dir,
    wait_for_console,
)

from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.hypervisor.base import VMConfig
from hypemand.hypervisor.qemu import QemuHypervisor, QemuVMHandle
from hypemand.hypervisor.storage import MIB
from hypemand.savedvm.sparse import data_extents
from hypemand.system.files import SystemFiles, ensure_system_files

GIB = 1 << 30
MEMORY_MIB = 1024
DIRTY_MIB = 640
BALLOON_MIB = 256
FILLED = "HM-BENCH-FILLED"
FILLER = GuestConfig(
    entrypoint=["/bin/sh", "-c"],
    cmd=[
        f"dd if=/dev/zero of=/dev/shm/fill bs=1M count={DIRTY_MIB} 2>/dev/null; rm /dev/shm/fill; "
        f"echo {FILLED}; exec sleep 100000"
    ],
)
SLEEPER = GuestConfig(cmd=["/bin/sleep", "100000"])


def meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values


def process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def resident_bytes(path: Path) -> int:
    """Page-cache pages of ``path`` (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def sample(vm: QemuVMHandle) -> dict[str, int]:
    data = sum(length for _offset, length in data_extents(vm.memory_file))
    return {
        "RAM file data": data,
        "RAM file in page cache": resident_bytes(vm.memory_file),
        "QEMU RSS": process_rss(vm.pid),
        "host MemAvailable": meminfo()["MemAvailable"],
    }


async def settle(vm: QemuVMHandle, target: int, limit: float = 600.0) -> float:
    """Seconds until the guest's balloon holds what ``target`` asks (query-balloon)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        # QEMU handles the guest's balloon pages in its main loop: under load, QMP waits for it.
        if (await vm.qmp("query-balloon", timeout=60))["actual"] <= target:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the balloon did not reach {target >> 20} MiB in {limit} s")


async def one_reclaim(
    hv: QemuHypervisor, system: SystemFiles, root: Path, directory: Path, by_hand: bool
) -> dict[str, float]:
    config = prepared_vm_config(
        system, guest_spec(directory, root, FILLER, memory_mib=MEMORY_MIB, network=False)
    )
    vm = await hv.start(config)
    assert isinstance(vm, QemuVMHandle)
    try:
        await wait_for_console(vm, FILLED, 300)
        await asyncio.sleep(1.0)  # the driver loads after the program started
        before = await asyncio.to_thread(sample, vm)
        target = vm.memory_bytes - BALLOON_MIB * MIB
        started = time.monotonic()
        if by_hand:
            await vm.qmp("balloon", {"value": target})
        else:
            await vm.set_guest_memory_target(target)
        asked = time.monotonic() - started
        took = await settle(vm, target)
        after = await asyncio.to_thread(sample, vm)
        result = {
            f"{key} returned per GiB": (before[key] - after[key]) / (BALLOON_MIB * MIB) for key in before
        }
        result["host MemAvailable gained per GiB"] = -result.pop("host MemAvailable returned per GiB")
        result["command (ms)"] = asked * 1000
        result["balloon settled (s)"] = took
        result["RAM file data before (MiB)"] = before["RAM file data"] / MIB
        result["QEMU RSS before (MiB)"] = before["QEMU RSS"] / MIB
        return result
    finally:
        await vm.kill()
        await vm.close()


async def one_boot(
    hv: QemuHypervisor, system: SystemFiles, root: Path, directory: Path, balloon: bool
) -> dict[str, float]:
    config: VMConfig = prepared_vm_config(system, guest_spec(directory, root, SLEEPER, network=False))
    config = config.model_copy(update={"balloon": balloon})
    started = time.monotonic()
    vm = await hv.start(config)
    try:
        await wait_for_markers(
            vm.console_log_path, [Marker.AGENT_READY, Marker.PROGRAM_START], 120, vm.is_alive
        )
        boot = time.monotonic() - started
        await asyncio.sleep(0.5)
        state = directory / "vm.state"
        await hv.save_state(vm, state)
        await hv.end_saved(vm)
        await vm.close()
        started = time.monotonic()
        vm = await hv.restore(directory, state)
        restore = time.monotonic() - started
        return {"boot to program start (s)": boot, "restore to cont (s)": restore}
    finally:
        if vm.is_alive():
            await vm.kill()
        await vm.close()


async def alternate(
    runs: int, label: str, arms: dict[str, Callable[[Path], Awaitable[dict[str, float]]]]
) -> None:
    results: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}
    for index in range(runs):
        for arm, run in arms.items():
            with tempfile.TemporaryDirectory(prefix="hm-bench-balloon-", dir="/var/tmp") as tmp:
                for key, value in (await run(Path(tmp) / f"vm{index}")).items():
                    results[arm].setdefault(key, []).append(value)
    print(f"\n{label} ({runs} runs each, alternating): median [min..max]")
    for arm, values in results.items():
        print(f"  {arm}")
        for key, series in values.items():
            print(f"    {key:42s} {statistics.median(series):9.3f}  [{min(series):.3f}..{max(series):.3f}]")
    first, second = list(results)
    for key in results[first]:
        a, b = statistics.median(results[first][key]), statistics.median(results[second][key])
        if b:
            print(f"  ratio {first} / {second}, {key}: {a / b:.3f}")


async def main(runs: int, only: str | None) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="hm-bench-balloon-", dir="/var/tmp"))
    hv = QemuHypervisor(state_dir=scratch)
    await hv.acceleration()
    system = await asyncio.to_thread(ensure_system_files, shared_system_dir())
    root = make_ext4_image(make_busybox_tree(scratch / "tree"), scratch / "root.ext4")
    if only in (None, "reclaim"):
        await alternate(
            runs,
            f"reclaim: {BALLOON_MIB} MiB ballooned out of {MEMORY_MIB} MiB, {DIRTY_MIB} MiB dirtied",
            {
                "through set_guest_memory_target": lambda d: one_reclaim(hv, system, root, d, by_hand=False),
                "QMP balloon by hand": lambda d: one_reclaim(hv, system, root, d, by_hand=True),
            },
        )
    if only in (None, "boot"):
        await alternate(
            runs,
            "the device's cost, 256 MiB microvm",
            {
                "with balloon": lambda d: one_boot(hv, system, root, d, balloon=True),
                "without balloon": lambda d: one_boot(hv, system, root, d, balloon=False),
            },
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="?", type=int, default=3)
    parser.add_argument("--only", choices=["reclaim", "boot"])
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.only))
