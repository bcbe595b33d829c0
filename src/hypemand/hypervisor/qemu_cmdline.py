"""The QEMU command line for a :class:`VMConfig`: pure, deterministic, unit-tested.

QEMU is started with the VM directory as its working directory, and every file inside that
directory is named relatively (sockets, logs, RAM file, disks that live there). That keeps socket
paths under the 108-byte limit and makes the recorded command line independent of where the
directory is, which later lets a copied directory (fork) reuse it without rewriting paths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hypemand.hypervisor.base import CONSOLE_LOG, CONTROL_SOCKET, MEMORY_FILE, Accel, Board, VMConfig
from hypemand.hypervisor.qemu_host import KVM_CPU, TCG_CPU

AGENT_PORT_NAME = "org.hypeman.agent"
AGENT_MAX_PORTS = 2
BASE_KERNEL_ARGS = ("console=ttyS0", "quiet", "panic=-1")

MACHINE_TYPES = {Board.QEMU_MICROVM: "microvm", Board.QEMU: "q35"}

# How many virtio devices each board carries, measured with this QEMU (7.2; the command line of
# build_qemu_argv): microvm has 24 virtio-mmio transports (with its second IOAPIC, on by
# default; a 25th virtio-blk-device finds "No 'virtio-bus' bus"), q35 with -nodefaults has 30
# free PCI slots (00.0 is the host bridge, 1f.x the ICH9 functions; a 31st device gets "PCI: no
# slot/function available"). tests/volumes_attach/test_board_limits.py checks both against QEMU.
VIRTIO_SLOTS = {Board.QEMU_MICROVM: 24, Board.QEMU: 30}
# What every VM takes of them before any volume: the root, overlay and config disks, the agent's
# virtio-serial controller, one NIC and the memory balloon (counted also for a VM without them:
# the limit must not depend on a setting).
BASE_VIRTIO_DEVICES = 6

# The memory balloon (VMConfig.balloon). deflate-on-oom: a guest about to OOM-kill takes pages
# back from its balloon instead, so a reclaim can slow a guest but never kill its program (the
# guest then counts the balloon as used memory: MemTotal stays, MemAvailable drops). Free page
# reporting stays off: QEMU 7.2 discards reported pages by punching holes in the RAM file even
# where it is mapped privately, i.e. in a fork's, which is its snapshot's file shared by every fork
# of it (hypervisor/README.md, "Memory balloon").
BALLOON_DEVICE_ID = "balloon0"
BALLOON_OPTIONS = "deflate-on-oom=on,free-page-reporting=off"


def free_virtio_slots(board: Board) -> int:
    """Virtio devices left for a VM's volume disks on ``board``."""
    return VIRTIO_SLOTS[board] - BASE_VIRTIO_DEVICES


def machine_type(board: Board) -> str:
    return MACHINE_TYPES[board]


def _opt(value: str) -> str:
    """Escape a value for QEMU's key=value,key=value option syntax (a comma is written twice)."""
    return value.replace(",", ",,")


def _path_arg(path: Path, directory: Path) -> str:
    """Relative to the VM directory when inside it, else absolute."""
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return str(path)


def guest_mac(vm_id: str) -> str:
    """A stable, locally administered MAC (QEMU's 52:54:00 prefix) derived from the VM id."""
    digest = hashlib.sha256(vm_id.encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*digest[:3])


def kernel_command_line(config: VMConfig, accel: Accel, tsc_khz: int | None) -> str:
    args = list(BASE_KERNEL_ARGS)
    # microvm has no HPET or ACPI PM timer; under TCG the guest's PIT calibration of the TSC can
    # fail and hang the boot. Telling the kernel the rate skips the calibration.
    if config.board is Board.QEMU_MICROVM and accel is Accel.TCG and tsc_khz:
        args.append(f"tsc_early_khz={tsc_khz}")
    args.extend(config.kernel_args)
    return " ".join(args)


def nic_mac(config: VMConfig) -> str:
    return config.nic_mac or guest_mac(config.vm_id)


def tap_netdev(fd: int) -> str:
    """The TAP backend on an open descriptor QEMU inherits. No vhost: these hosts have no
    /dev/vhost-net (QEMU asserts with vhost=on)."""
    return f"tap,id=net0,fd={fd},vhost=off"


def build_qemu_argv(
    config: VMConfig, *, binary: Path, accel: Accel, tsc_khz: int | None, tap_fd: int | None = None
) -> list[str]:
    """The full argv (binary first) that boots ``config``; run it with cwd = ``config.directory``.
    ``tap_fd``: the descriptor number of the VM's TAP in QEMU (required with ``tap_network``)."""
    directory = config.directory
    microvm = config.board is Board.QEMU_MICROVM
    # virtio devices: virtio-mmio on microvm, PCI on q35.
    bus = "device" if microvm else "pci"

    machine = [machine_type(config.board)]
    if microvm:
        machine.append("x-option-roms=off")
    machine.append("memory-backend=ram0")

    argv: list[str] = [
        str(binary),
        "-name", _opt(config.vm_id),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", ",".join(machine),
        "-accel", accel.value,
        "-cpu", KVM_CPU if accel is Accel.KVM else TCG_CPU,
        "-smp", str(config.vcpus),
        "-m", f"{config.memory_mib}M",
        "-object",
        f"memory-backend-file,id=ram0,size={config.memory_mib}M,mem-path={MEMORY_FILE},share=on",
        "-kernel", _opt(str(config.kernel)),
    ]  # fmt: skip
    if config.initrd is not None:
        argv += ["-initrd", _opt(str(config.initrd))]
    argv += ["-append", kernel_command_line(config, accel, tsc_khz)]

    # Control channel and guest console.
    argv += [
        "-chardev", f"socket,id=qmp,path={CONTROL_SOCKET},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={_opt(CONSOLE_LOG)},append=on",
        "-serial", "chardev:serial0",
    ]  # fmt: skip

    for index, disk in enumerate(config.disks):
        drive = [
            f"id=disk{index}",
            f"file={_opt(_path_arg(disk.path, directory))}",
            f"format={disk.format.value}",
            "if=none",
        ]
        if disk.readonly:
            # Shared read-only images (one rootfs, many VMs) must not take QEMU's image lock.
            drive += ["readonly=on", "file.locking=off"]
        else:
            # A full host filesystem pauses the VM (run state io-error, the disk's io-status
            # "nospace") instead of failing the guest's write: once there is space, `cont`
            # retries the write and the guest never knew. Other write errors reach the guest.
            drive.append("werror=enospc")
        drive.append("rerror=report")  # a failed read is the guest's to handle
        argv += ["-drive", ",".join(drive)]
        argv += ["-device", f"virtio-blk-{bus},drive=disk{index},serial={disk.serial}"]

    # Guest agent: a virtio-serial port bridged to a Unix socket (no vsock on these hosts).
    # max_ports=2: port 0 (reserved for a console) and the agent's. QEMU's default of 31 ports
    # makes the guest driver set up 64 virtqueues, about 0.13 s of a TCG boot.
    argv += [
        "-device", f"virtio-serial-{bus},id=vser0,max_ports={AGENT_MAX_PORTS}",
        "-chardev", f"socket,id=agent0,path={config.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
    ]  # fmt: skip

    if config.user_network:
        # The fallback where no bridge can be built: egress works (NAT by QEMU, the host's
        # loopback as 10.0.2.2), nothing reaches the guest but the port forwards.
        netdev = ["user", "id=net0"]
        for forward in config.port_forwards:
            netdev.append(
                f"hostfwd={forward.protocol.value}:127.0.0.1:{forward.host_port}-:{forward.guest_port}"
            )
        argv += ["-netdev", ",".join(netdev)]
        argv += ["-device", f"virtio-net-{bus},netdev=net0,mac={nic_mac(config)}"]
    elif config.tap_network:
        if tap_fd is None:
            raise ValueError(f"VM {config.vm_id}: a TAP NIC needs the TAP's descriptor")
        argv += ["-netdev", tap_netdev(tap_fd)]
        argv += ["-device", f"virtio-net-{bus},netdev=net0,mac={nic_mac(config)}"]

    if config.balloon:
        # Last, so that the devices before it keep the transports and PCI slots they had.
        argv += ["-device", f"virtio-balloon-{bus},id={BALLOON_DEVICE_ID},{BALLOON_OPTIONS}"]
    return argv
