"""Boot to a usable guest, against bare QEMU booting the same kernel in the same run.

    .venv/bin/python -m bench.boot [--runs 5]

Bare QEMU: the same microvm flags, kernel and kernel arguments, and a one-line busybox initramfs
that prints a line: the least a VM can do. hypemand: ``boot_guest`` of a busybox ext4 image
(overlay root, config disk, agent), timed to the moment it returns (program started, agent
connected) and to the first exec answered. Runs alternate so that load drift hits both alike.
Ratios are hypemand / bare; the QEMU resident memory is compared the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hypemand.config import default_data_dir, default_system_dir
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.hypervisor.qemu_host import find_qemu_binary, host_tsc_khz
from hypemand.instances.boot import GuestSpec, boot_guest
from hypemand.system.files import SystemFiles, ensure_system_files
from hypemand.system.initrd import CpioEntry, write_cpio_newc

BARE_READY = b"BARE-READY"
PROGRAM = GuestConfig(entrypoint=["/bin/sh", "-c", "while true; do sleep 3600; done"])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bare_initramfs(path: Path) -> Path:
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    init = b"#!/bin/busybox sh\n/bin/busybox echo " + BARE_READY + b"\n/bin/busybox sleep 3600\n"
    path.write_bytes(write_cpio_newc([
        CpioEntry("bin", 0o40755),
        CpioEntry("bin/busybox", 0o100755, busybox),
        CpioEntry("init", 0o100755, init),
        CpioEntry("dev", 0o40755),
        CpioEntry("dev/console", 0o20600, rdev_major=5, rdev_minor=1),
    ]))
    return path


def busybox_ext4(where: Path) -> Path:
    tree = where / "tree"
    (tree / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, tree / "bin/busybox")
    for applet in ("sh", "sleep", "true", "echo"):
        (tree / "bin" / applet).symlink_to("busybox")
    image = where / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "16M"],
                   check=True, capture_output=True)
    return image


async def bare_qemu_boot(system: SystemFiles, initrd: Path, workdir: Path) -> dict[str, float]:
    console = workdir / "console.log"
    argv = [
        str(find_qemu_binary()), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-M", "microvm,x-option-roms=off", "-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1",
        "-kernel", str(system.kernel_path), "-initrd", str(initrd),
        # The same kernel arguments hypemand passes, so the ratio is what hypemand itself adds.
        "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()} {system.kernel_args}",
        "-serial", f"file:{console}",
    ]  # fmt: skip
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while BARE_READY not in (console.read_bytes() if console.exists() else b""):
            if process.returncode is not None or time.monotonic() - started > 120:
                raise RuntimeError("bare QEMU did not boot")
            await asyncio.sleep(0.01)
        ready = time.monotonic() - started
        return {"ready_s": ready, "rss_bytes": float(rss_bytes(process.pid))}
    finally:
        process.kill()
        await process.wait()


async def hypemand_boot(system: SystemFiles, root: Path, workdir: Path) -> dict[str, float]:
    hypervisor = QemuHypervisor(state_dir=workdir.parent / "hypervisor")
    spec = GuestSpec(vm_id="bench", directory=workdir / "vm", root_disk=root, guest=PROGRAM, network=False)
    started = time.monotonic()
    guest = await boot_guest(hypervisor, system, spec)
    try:
        ready = time.monotonic() - started
        await guest.agent.run(["/bin/true"])
        exec_answered = time.monotonic() - started
        rss = rss_bytes(guest.handle.pid)
        t0 = time.monotonic()
        await guest.handle.pause()
        paused = time.monotonic() - t0
        t0 = time.monotonic()
        await guest.handle.resume()
        resumed = time.monotonic() - t0
        return {"ready_s": ready, "exec_answered_s": exec_answered, "rss_bytes": float(rss),
                "pause_s": paused, "resume_s": resumed}
    finally:
        with contextlib.suppress(Exception):
            await guest.handle.kill()
        await guest.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    system_dir = Path(os.environ.get("HYPEMAND_SYSTEM_DIR") or default_system_dir(default_data_dir()))
    system = ensure_system_files(system_dir)
    bare: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="hypemand-bench-") as tmp:
        where = Path(tmp)
        initrd = bare_initramfs(where / "bare.cpio")
        root = busybox_ext4(where)
        for run in range(args.runs):
            for name, results, boot in (("bare", bare, bare_qemu_boot), ("hypemand", ours, hypemand_boot)):
                workdir = where / f"{name}-{run}"
                workdir.mkdir()
                source = initrd if name == "bare" else root
                results.append(await boot(system, source, workdir))
                print(f"run {run + 1}/{args.runs} {name}: ready {results[-1]['ready_s']:.2f} s", flush=True)

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    bare_ready = median(bare, "ready_s")
    print(f"\nmedians over {args.runs} alternating runs (TCG, microvm, 256 MiB)")
    print(f"  bare QEMU, kernel to init          {bare_ready:6.2f} s")
    print(f"  hypemand, program + agent ready    {median(ours, 'ready_s'):6.2f} s   "
          f"ratio {median(ours, 'ready_s') / bare_ready:.2f}")
    print(f"  hypemand, first exec answered      {median(ours, 'exec_answered_s'):6.2f} s   "
          f"ratio {median(ours, 'exec_answered_s') / bare_ready:.2f}")
    print(f"  QEMU RSS bare / hypemand           {median(bare, 'rss_bytes') / 2**20:6.0f} MiB / "
          f"{median(ours, 'rss_bytes') / 2**20:.0f} MiB   ratio "
          f"{median(ours, 'rss_bytes') / median(bare, 'rss_bytes'):.2f}")
    print(f"  pause / resume                     {median(ours, 'pause_s') * 1000:6.1f} ms / "
          f"{median(ours, 'resume_s') * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
