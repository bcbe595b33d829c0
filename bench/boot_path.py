"""Boot-path timing: QEMU start -> HYPEMAN-AGENT-READY, for kernel-argument and initrd variants.

    .venv/bin/python -m bench.boot_path --runs 5 [--system-dir DIR]

Runs the variants interleaved (the machine is shared, so load drifts) and prints, per variant,
the wall time to AGENT-READY, the guest's own timestamp of it, and the guest time at which
init started (from ``hypeman.debug``). Uses the minimal launcher of tests/boot/support.py.
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

from tests.boot.support import BASE_KERNEL_ARGS, make_busybox_tree, make_ext4_image, run_guest

from hypemand.config import Settings
from hypemand.guest.config_disk import GuestConfig, GuestNetwork
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.system.files import SystemFiles, ensure_system_files
from hypemand.system.kernel import FAST_BOOT_ARGS


def variants(files: SystemFiles, scratch: Path) -> dict[str, tuple[SystemFiles, str]]:
    gz = scratch / "initrd.gz"
    gz.write_bytes(gzip.compress(files.initrd_path.read_bytes(), compresslevel=6, mtime=0))
    gz_files = files.model_copy(update={"initrd_path": gz})
    base = BASE_KERNEL_ARGS + " hypeman.debug"
    return {
        "plain": (files, base),
        "gzip initrd": (gz_files, base),
        "fast args": (files, f"{base} {FAST_BOOT_ARGS}"),
        "fast bzImage": (
            files.model_copy(update={"kernel_path": files.kernel_bzimage_path}),
            f"{base} {FAST_BOOT_ARGS}",
        ),
        "fast+nomitig": (files, f"{base} {FAST_BOOT_ARGS} mitigations=off"),
    }


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
        config = GuestConfig(cmd=["/bin/true"], network=None if args.no_network else GuestNetwork.user_mode())
        table = variants(files, scratch)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in table}
        for run_index in range(args.runs):
            for name, (variant_files, kernel_args) in table.items():
                workdir = scratch / f"vm-{run_index}-{name.replace(' ', '-')}"
                started = time.monotonic()
                with run_guest(variant_files, workdir, image, config, kernel_args=kernel_args) as run:
                    markers = asyncio.run(
                        wait_for_markers(run.console_log, [Marker.AGENT_READY], 120, run.is_alive)
                    )
                    wall = time.monotonic() - started
                    console = run.console()
                init_match = re.search(r"\[([0-9.]+)\] init started", console)
                init_ts = float(init_match.group(1)) if init_match else float("nan")
                results[name].append((wall, markers.agent_ready_ts or float("nan"), init_ts))
                shutil.rmtree(workdir, ignore_errors=True)
        print(f"{'variant':<14} {'wall->READY median (runs)':<44} {'guest READY':>12} {'guest init':>11}")
        for name, rows in results.items():
            walls = " ".join(f"{r[0]:.2f}" for r in rows)
            wall = f"{statistics.median(r[0] for r in rows):5.2f}  ({walls})"
            ready = statistics.median(r[1] for r in rows)
            init = statistics.median(r[2] for r in rows)
            print(f"{name:<14} {wall:<44} {ready:>12.3f} {init:>11.3f}")


if __name__ == "__main__":
    main()
