"""The pure parts of TAP networking: the config's NIC fields, the command line, and the launch
records derived for a restore (a new descriptor number) and a fork (its own MAC)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from hypemand.hypervisor.base import Accel, Board, ForkIdentity, VMConfig
from hypemand.hypervisor.qemu_cmdline import build_qemu_argv, guest_mac
from hypemand.hypervisor.qemu_launch import QemuLaunchRecord, fork_argv, tap_fd_argv
from tests.hypervisor.test_qemu_cmdline import QEMU, VM_DIR, make_config, option

MAC = "02:00:00:0a:0b:0c"


def tap_config(**overrides: object) -> VMConfig:
    return make_config(user_network=False, port_forwards=[], tap_network=True, **overrides)


def launch_of(config: VMConfig, tap_fd: int | None) -> QemuLaunchRecord:
    argv = build_qemu_argv(config, binary=QEMU, accel=Accel.TCG, tsc_khz=None, tap_fd=tap_fd)
    return QemuLaunchRecord(
        qemu_version="7.2.22", qemu_binary=str(QEMU), machine="microvm", accel=Accel.TCG, tsc_khz=None,
        config=config, argv=argv, launched_at=datetime.now(UTC),
    )  # fmt: skip


@pytest.mark.parametrize(("board", "bus"), [(Board.QEMU_MICROVM, "device"), (Board.QEMU, "pci")])
def test_a_tap_nic_takes_the_descriptor_and_the_given_mac(board: Board, bus: str) -> None:
    argv = build_qemu_argv(tap_config(board=board, nic_mac=MAC), binary=QEMU, accel=Accel.TCG, tsc_khz=None,
                           tap_fd=17)
    assert option(argv, "-netdev") == ["tap,id=net0,fd=17,vhost=off"]
    assert f"virtio-net-{bus},netdev=net0,mac={MAC}" in option(argv, "-device")


def test_without_a_mac_both_nic_kinds_derive_it_from_the_id() -> None:
    tap = build_qemu_argv(tap_config(), binary=QEMU, accel=Accel.TCG, tsc_khz=None, tap_fd=3)
    user = build_qemu_argv(make_config(), binary=QEMU, accel=Accel.TCG, tsc_khz=None)
    nic = f"virtio-net-device,netdev=net0,mac={guest_mac('abc')}"
    assert nic in option(tap, "-device") and nic in option(user, "-device")
    user_with_mac = build_qemu_argv(make_config(nic_mac=MAC), binary=QEMU, accel=Accel.TCG, tsc_khz=None)
    assert f"virtio-net-device,netdev=net0,mac={MAC}" in option(user_with_mac, "-device")


def test_a_tap_nic_without_its_descriptor_is_a_bug() -> None:
    with pytest.raises(ValueError, match="descriptor"):
        build_qemu_argv(tap_config(), binary=QEMU, accel=Accel.TCG, tsc_khz=None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"user_network": True, "tap_network": True}, "one NIC"),
        ({"tap_network": True, "port_forwards": [{"host_port": 1, "guest_port": 2}], "user_network": False},
         "port forwards need user_network"),
        ({"nic_mac": "01:00:5e:00:00:01"}, "not a unicast"),
        ({"nic_mac": "00:00:00:00:00:00"}, "not a unicast"),
        ({"nic_mac": "02:00:00:0a:0b"}, "not a MAC address"),
        ({"nic_mac": "02:00:00:0a:0b:zz"}, "not a MAC address"),
    ],
)
def test_nic_refusals(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_config(**overrides)


def test_a_mac_is_kept_in_lower_case() -> None:
    assert make_config(nic_mac="02-00-00-0A-0B-0C").nic_mac == MAC
    assert ForkIdentity(vm_id="f", mac="02:00:00:0A:0B:0C").mac == MAC
    with pytest.raises(ValidationError):
        ForkIdentity(vm_id="f", mac="ff:ff:ff:ff:ff:ff")


def test_a_restore_records_the_descriptor_it_really_uses() -> None:
    launch = launch_of(tap_config(nic_mac=MAC), tap_fd=9)
    restored = launch.for_restore(VM_DIR).with_tap_fd(23)
    assert option(restored.argv, "-netdev") == ["tap,id=net0,fd=23,vhost=off"]
    assert restored.argv[-2:] == ["-incoming", "defer"]
    assert [a for a in restored.argv if "fd=" not in a] == [a for a in launch.for_restore(VM_DIR).argv
                                                            if "fd=" not in a]
    with pytest.raises(ValueError, match="no TAP NIC"):
        tap_fd_argv(launch_of(make_config(), tap_fd=None).argv, 5)


def test_a_fork_gets_its_own_mac_in_argv_and_config() -> None:
    launch = launch_of(tap_config(nic_mac=MAC), tap_fd=9)
    fork_dir = Path("/var/lib/hypemand/guests/fork1")
    fork = launch.for_fork(fork_dir, "fork1", "02:00:00:0d:0e:0f")
    assert fork.config.nic_mac == "02:00:00:0d:0e:0f" and fork.config.vm_id == "fork1"
    assert "virtio-net-device,netdev=net0,mac=02:00:00:0d:0e:0f" in option(fork.argv, "-device")
    assert option(fork.argv, "-name") == ["fork1"]
    # Without one, argv and config agree on the MAC derived from the fork's id (not the source's).
    derived = launch.for_fork(fork_dir, "fork1")
    assert derived.config.nic_mac is None
    assert f"virtio-net-device,netdev=net0,mac={guest_mac('fork1')}" in option(derived.argv, "-device")
    assert fork_argv(launch.argv, "fork1") == derived.argv
