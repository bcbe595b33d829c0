"""A deliberately minimal QEMU launcher for boot-path tests (independent of hypervisor/).

It boots the system files with the three serial-tagged disks, the agent virtio-serial port
and restricted user networking, writing the serial console to a file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypemand.guest.config_disk import GuestConfig, make_overlay_disk, write_config_disk
from hypemand.system.files import SystemFiles


def host_tsc_khz() -> int:
    """The host TSC frequency; microvm under TCG hangs without tsc_early_khz (qemu doc §2)."""
    try:
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    except OSError:
        dmesg = ""
    if m := re.search(r"tsc: Detected ([0-9.]+) MHz", dmesg):
        return round(float(m.group(1)) * 1000)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    m = re.search(r"cpu MHz\s*:\s*([0-9.]+)", cpuinfo)
    assert m, "cannot find the host CPU frequency"
    return round(float(m.group(1)) * 1000)


def make_busybox_tree(root: Path) -> Path:
    """A directory holding static busybox with its applet links: the smallest useful image."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed for boot tests"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    for directory in ("etc", "tmp", "proc", "sys", "dev", "run", "root"):
        (root / directory).mkdir(exist_ok=True)
    return root


def make_ext4_image(tree: Path, image: Path, size_mb: int = 16) -> Path:
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), f"{size_mb}M"],
        check=True,
        capture_output=True,
    )
    return image


def make_erofs_image(tree: Path, image: Path) -> Path:
    subprocess.run(["mkfs.erofs", "-zlz4hc", str(image), str(tree)], check=True, capture_output=True)
    return image


@dataclass
class GuestRun:
    process: subprocess.Popen[bytes]
    console_log: Path
    agent_socket: Path

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)


BASE_KERNEL_ARGS = "console=ttyS0 panic=-1 quiet"


def qemu_command(
    files: SystemFiles,
    workdir: Path,
    root_disk: Path,
    overlay_disk: Path,
    config_disk: Path,
    kernel_args: str = BASE_KERNEL_ARGS,
    machine: str = "microvm",
) -> list[str]:
    """microvm (virtio-mmio devices, PVH vmlinux) or q35 (virtio-pci devices)."""
    console_log = workdir / "console.log"
    agent_socket = workdir / "agent.sock"
    if machine == "microvm":
        machine_args = ["-M", "microvm,x-option-roms=off"]
        kernel_args = f"{kernel_args} tsc_early_khz={host_tsc_khz()}"
        bus = "device"
    else:
        machine_args = ["-M", machine]
        bus = "pci"
    return [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *machine_args,
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "256M",
        "-smp",
        "1",
        "-kernel",
        str(files.kernel_path),
        "-initrd",
        str(files.initrd_path),
        "-append",
        kernel_args,
        "-serial",
        f"file:{console_log}",
        "-drive",
        f"id=root,file={root_disk},format=raw,if=none,readonly=on",
        "-device",
        f"virtio-blk-{bus},drive=root,serial=hm-root",
        "-drive",
        f"id=overlay,file={overlay_disk},format=raw,if=none",
        "-device",
        f"virtio-blk-{bus},drive=overlay,serial=hm-overlay",
        "-drive",
        f"id=config,file={config_disk},format=raw,if=none,readonly=on",
        "-device",
        f"virtio-blk-{bus},drive=config,serial=hm-config",
        "-device",
        f"virtio-serial-{bus}",
        "-chardev",
        f"socket,id=agent0,path={agent_socket},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent0,name=org.hypeman.agent",
        "-netdev",
        "user,id=n0,restrict=on",
        "-device",
        f"virtio-net-{bus},netdev=n0",
    ]


@contextmanager
def run_guest(
    files: SystemFiles,
    workdir: Path,
    root_disk: Path,
    config: GuestConfig,
    overlay_disk: Path | None = None,
    kernel_args: str = BASE_KERNEL_ARGS,
    machine: str = "microvm",
) -> Iterator[GuestRun]:
    """Boot a guest; it is always killed (whole process group) when the block ends.

    Without ``overlay_disk`` a fresh 64 MiB one is made in ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_disk = workdir / "config.raw"
    if overlay_disk is None:
        overlay_disk = workdir / "overlay.raw"
        make_overlay_disk(overlay_disk, 64 << 20)
    write_config_disk(config_disk, config)
    command = qemu_command(files, workdir, root_disk, overlay_disk, config_disk, kernel_args, machine)
    qemu_log = (workdir / "qemu.log").open("wb")
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield GuestRun(process, workdir / "console.log", workdir / "agent.sock")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        qemu_log.close()


def wait_for_exit(run: GuestRun, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = run.process.poll()
    assert code is not None, f"QEMU did not exit by itself; console:\n{run.console()}"
    return code
