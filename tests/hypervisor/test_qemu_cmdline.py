"""Unit tests of the pure parts: config validation and the QEMU command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hypemand.hypervisor.base import (
    Accel,
    Board,
    DiskConfig,
    DiskFormat,
    ForwardProtocol,
    PortForward,
    VMConfig,
)
from hypemand.hypervisor.qemu_cmdline import build_qemu_argv, guest_mac, kernel_command_line
from hypemand.hypervisor.qemu_host import parse_qemu_version, probe_bios_image

VM_DIR = Path("/var/lib/hypemand/guests/abc")
QEMU = Path("/usr/bin/qemu-system-x86_64")


def make_config(**overrides: object) -> VMConfig:
    values: dict[str, object] = {
        "vm_id": "abc",
        "directory": VM_DIR,
        "kernel": Path("/sys-files/vmlinux"),
        "initrd": Path("/sys-files/initrd.cpio"),
        "disks": [
            DiskConfig(path=Path("/images/busybox/rootfs.erofs"), readonly=True, serial="hm-root"),
            DiskConfig(path=VM_DIR / "overlay.raw", serial="hm-overlay"),
            DiskConfig(path=VM_DIR / "config.raw", readonly=True, serial="hm-config"),
        ],
        "user_network": True,
        "port_forwards": [
            PortForward(host_port=8080, guest_port=80),
            PortForward(host_port=5353, guest_port=53, protocol=ForwardProtocol.UDP),
        ],
    }
    values.update(overrides)
    return VMConfig.model_validate(values)


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_microvm_command_line_under_tcg() -> None:
    argv = build_qemu_argv(make_config(), binary=QEMU, accel=Accel.TCG, tsc_khz=2445412)
    assert argv[0] == str(QEMU)
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    assert option(argv, "-machine") == ["microvm,x-option-roms=off,memory-backend=ram0"]
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-cpu") == ["max"]
    assert option(argv, "-m") == ["256M"]
    assert option(argv, "-object") == ["memory-backend-file,id=ram0,size=256M,mem-path=memory.ram,share=on"]
    assert option(argv, "-kernel") == ["/sys-files/vmlinux"]
    assert option(argv, "-initrd") == ["/sys-files/initrd.cpio"]
    assert option(argv, "-append") == ["console=ttyS0 quiet panic=-1 tsc_early_khz=2445412"]
    # Sockets and logs are relative: QEMU runs in the VM directory.
    chardevs = option(argv, "-chardev")
    assert "socket,id=qmp,path=qemu.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent0,path=agent.sock,server=on,wait=off" in chardevs
    assert "file,id=serial0,path=logs/app.log,append=on" in chardevs
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert option(argv, "-serial") == ["chardev:serial0"]

    devices = option(argv, "-device")
    assert "virtio-blk-device,drive=disk0,serial=hm-root" in devices
    assert "virtio-blk-device,drive=disk1,serial=hm-overlay" in devices
    assert "virtio-blk-device,drive=disk2,serial=hm-config" in devices
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent0,name=org.hypeman.agent" in devices
    assert f"virtio-net-device,netdev=net0,mac={guest_mac('abc')}" in devices
    assert not any("-pci" in device for device in devices)

    assert option(argv, "-drive") == [
        "id=disk0,file=/images/busybox/rootfs.erofs,format=raw,if=none,readonly=on,file.locking=off,"
        "rerror=report",
        # Inside the VM dir: relative. Writable: a full host disk pauses the VM (io-error).
        "id=disk1,file=overlay.raw,format=raw,if=none,werror=enospc,rerror=report",
        "id=disk2,file=config.raw,format=raw,if=none,readonly=on,file.locking=off,rerror=report",
    ]
    assert option(argv, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:5353-:53"
    ]


def test_q35_uses_pci_devices_and_no_tsc_hint() -> None:
    config = make_config(board=Board.QEMU, vcpus=2, memory_mib=512)
    argv = build_qemu_argv(config, binary=QEMU, accel=Accel.TCG, tsc_khz=2445412)
    assert option(argv, "-machine") == ["q35,memory-backend=ram0"]
    assert option(argv, "-smp") == ["2"]
    assert option(argv, "-m") == ["512M"]
    assert "size=512M" in option(argv, "-object")[0]
    devices = option(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,serial=hm-root" in devices
    assert "virtio-serial-pci,id=vser0,max_ports=2" in devices
    assert any(device.startswith("virtio-net-pci,") for device in devices)
    # q35 has HPET and an ACPI PM timer: the guest calibrates its TSC itself.
    assert "tsc_early_khz" not in option(argv, "-append")[0]


@pytest.mark.parametrize(("board", "bus"), [(Board.QEMU_MICROVM, "device"), (Board.QEMU, "pci")])
def test_the_balloon_comes_last_and_only_when_asked(board: Board, bus: str) -> None:
    without = build_qemu_argv(make_config(board=board), binary=QEMU, accel=Accel.TCG, tsc_khz=None)
    assert not any("balloon" in arg for arg in without)  # a launch record from before: unchanged
    argv = build_qemu_argv(make_config(board=board, balloon=True), binary=QEMU, accel=Accel.TCG, tsc_khz=None)
    # Last: the devices before it keep their transports / PCI slots.
    assert argv[:-2] == without
    balloon = f"virtio-balloon-{bus},id=balloon0,deflate-on-oom=on,free-page-reporting=off"
    assert argv[-2:] == ["-device", balloon]


def test_a_launch_record_without_balloon_reads_as_none() -> None:
    data = make_config().model_dump(mode="json")
    del data["balloon"]
    assert VMConfig.model_validate(data).balloon is False


def test_kvm_uses_host_cpu_without_arch_capabilities() -> None:
    argv = build_qemu_argv(make_config(), binary=QEMU, accel=Accel.KVM, tsc_khz=None)
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-cpu") == ["host,-arch-capabilities"]
    assert "tsc_early_khz" not in option(argv, "-append")[0]


def test_kernel_args_extras_come_last() -> None:
    config = make_config(kernel_args=["hm.debug=1", "init=/init"])
    line = kernel_command_line(config, Accel.TCG, 1000000)
    assert line == "console=ttyS0 quiet panic=-1 tsc_early_khz=1000000 hm.debug=1 init=/init"


def test_no_network_no_netdev_and_qcow2_format() -> None:
    config = make_config(
        user_network=False,
        port_forwards=[],
        disks=[DiskConfig(path=VM_DIR / "disk.qcow2", format=DiskFormat.QCOW2, serial="hm-vol-1")],
    )
    argv = build_qemu_argv(config, binary=QEMU, accel=Accel.TCG, tsc_khz=None)
    assert option(argv, "-netdev") == []
    assert option(argv, "-drive") == [
        "id=disk0,file=disk.qcow2,format=qcow2,if=none,werror=enospc,rerror=report"
    ]
    assert option(argv, "-append") == ["console=ttyS0 quiet panic=-1"]


def test_commas_in_paths_are_escaped() -> None:
    config = make_config(
        kernel=Path("/odd,dir/vmlinux"), disks=[DiskConfig(path=Path("/a,b/x.raw"), serial="s")]
    )
    argv = build_qemu_argv(config, binary=QEMU, accel=Accel.TCG, tsc_khz=None)
    assert option(argv, "-kernel") == ["/odd,,dir/vmlinux"]
    assert option(argv, "-drive")[0].startswith("id=disk0,file=/a,,b/x.raw,")


def test_mac_is_stable_and_locally_administered() -> None:
    assert guest_mac("abc") == guest_mac("abc")
    assert guest_mac("abc") != guest_mac("abd")
    assert guest_mac("abc").startswith("52:54:00:")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vm_id": "../escape"}, "vm_id"),
        ({"directory": Path("relative/dir")}, "absolute"),
        ({"kernel": Path("vmlinux")}, "absolute"),
        ({"agent_socket": "sub/agent.sock"}, "agent_socket"),
        ({"user_network": False}, "port forwards need user_network"),
        (
            {"disks": [DiskConfig(path=Path("/a"), serial="x"), DiskConfig(path=Path("/b"), serial="x")]},
            "unique",
        ),
        (
            {
                "port_forwards": [
                    PortForward(host_port=1, guest_port=2),
                    PortForward(host_port=1, guest_port=3),
                ]
            },
            "unique",
        ),
        ({"vcpus": 0}, "vcpus"),
    ],
)
def test_invalid_configs_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_config(**overrides)


def test_disk_serial_limits() -> None:
    with pytest.raises(ValidationError):
        DiskConfig(path=Path("/x"), serial="a" * 21)
    with pytest.raises(ValidationError):
        DiskConfig(path=Path("/x"), serial="bad serial")
    with pytest.raises(ValidationError):
        DiskConfig(path=Path("relative"), serial="ok")


def test_config_round_trips_through_json() -> None:
    config = make_config(accel=Accel.TCG)
    assert VMConfig.model_validate_json(config.model_dump_json()) == config


def test_parse_qemu_version() -> None:
    text = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022"
    assert parse_qemu_version(text) == "7.2.22"


def test_probe_bios_has_code_at_the_reset_vector() -> None:
    image = probe_bios_image(iterations=1234)
    assert len(image) == 0x10000
    assert image[0xFFF0:0xFFF2] == b"\x66\xb9"  # mov ecx, imm32
    assert int.from_bytes(image[0xFFF2:0xFFF6], "little") == 1234
    assert b"\xe6\xf4" in image[0xFFF0:]  # out 0xf4, al
