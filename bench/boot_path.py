"""Boot-path timing: QEMU start -> guest ready, for kernel-argument and initrd variants.

    .venv/bin/python -m bench.boot_path --runs 5 [--system-dir DIR]

Runs the variants interleaved (the machine is shared, so load drifts) and prints, per variant,
the wall time until ``boot_guest`` returns (program started, agent answered), the guest's own
timestamp of HYPEMAN-AGENT-READY, and the guest time at which init started (from
``hypeman.debug``). Variants are ``SystemFiles`` with other kernel arguments, initrd or kernel
file, booted through the real ``QemuHypervisor`` + ``boot_guest``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.guest import guest_spec, make_busybox_tree, make_ext4_image

from hypemand.config import Settings
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.instances.boot import boot_guest
from hypemand.system.files import SystemFiles, ensure_system_files
from hypemand.system.kernel import FAST_BOOT_ARGS

# The hypervisor adds "console=ttyS0 quiet panic=-1" (and tsc_early_khz on microvm) itself.
DEBUG_ARG = "hypeman.debug"


def variants(files: SystemFiles, scratch: Path) -> dict[str, SystemFiles]:
    gz = scratch / "initrd.gz"
    gz.write_bytes(gzip.compress(files.initrd_path.read_bytes(), compresslevel=6, mtime=0))
    fast = f"{DEBUG_ARG} {FAST_BOOT_ARGS}"
    return {
        "plain": files.model_copy(update={"kernel_args": DEBUG_ARG}),
        "gzip initrd": files.model_copy(update={"kernel_args": DEBUG_ARG, "initrd_path": gz}),
        "fast args": files.model_copy(update={"kernel_args": fast}),
        "fast bzImage": files.model_copy(
            update={"kernel_args": fast, "kernel_path": files.kernel_bzimage_path}
        ),
        "fast+nomitig": files.model_copy(update={"kernel_args": f"{fast} mitigations=off"}),
    }


async def boot_once(hypervisor: QemuHypervisor, files: SystemFiles, directory: Path, image: Path,
                    network: bool) -> tuple[float, float, float]:
    spec = guest_spec(directory, image, GuestConfig(cmd=["/bin/sleep", "100000"]), network=network)
    started = time.monotonic()
    guest = await boot_guest(hypervisor, files, spec, timeout=120)
    wall = time.monotonic() - started
    try:
        console = guest.handle.console_log_path.read_text(errors="replace")
    finally:
        await guest.handle.kill()
        await guest.close()
    init_match = re.search(r"\[([0-9.]+)\] init started", console)
    init_ts = float(init_match.group(1)) if init_match else float("nan")
    return wall, guest.markers.agent_ready_ts or float("nan"), init_ts


async def run_variants(
    table: dict[str, SystemFiles], image: Path, runs: int, network: bool
) -> dict[str, list[tuple[float, float, float]]]:
    scratch = image.parent
    hypervisor = QemuHypervisor(state_dir=scratch / "hv")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in table}
    for run_index in range(runs):
        for name, variant_files in table.items():
            workdir = scratch / f"vm-{run_index}-{name.replace(' ', '-').replace('+', '-')}"
            results[name].append(await boot_once(hypervisor, variant_files, workdir, image, network))
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--system-dir", type=Path, default=None)
    parser.add_argument("--no-network", action="store_true")
    args = parser.parse_args()
    files = ensure_system_files(args.system_dir or Settings.load().system_dir)
    with tempfile.TemporaryDirectory(prefix="boot-bench-") as tmp:
        scratch = Path(tmp)
        image = make_ext4_image(make_busybox_tree(scratch / "tree"), scratch / "root.ext4")
        results = asyncio.run(run_variants(variants(files, scratch), image, args.runs, not args.no_network))
        print(f"{'variant':<14} {'wall->booted median (runs)':<44} {'guest READY':>12} {'guest init':>11}")
        for name, rows in results.items():
            walls = " ".join(f"{r[0]:.2f}" for r in rows)
            wall = f"{statistics.median(r[0] for r in rows):5.2f}  ({walls})"
            ready = statistics.median(r[1] for r in rows)
            init = statistics.median(r[2] for r in rows)
            print(f"{name:<14} {wall:<44} {ready:>12.3f} {init:>11.3f}")


if __name__ == "__main__":
    main()
