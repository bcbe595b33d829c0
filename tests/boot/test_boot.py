"""Real boots: the system files, the C init and a busybox image under QEMU (microvm, TCG)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from hypemand.guest.config_disk import GuestConfig, GuestNetwork, make_overlay_disk
from hypemand.guest.markers import GuestBootTimeout, Marker, parse_markers, wait_for_markers
from hypemand.system.files import SystemFiles
from tests.boot.support import make_erofs_image, run_guest, wait_for_exit

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120  # TCG on 2 shared cores: a boot takes 3-10 s, more when others boot too


def test_program_runs_with_its_config_and_exit_code_is_reported(
    system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    script = (
        "echo hello-from-guest; echo FOO=$FOO; echo PWD=$(pwd); echo HOST=$(hostname); "
        "ip -4 addr show eth0; ip route; cat /etc/resolv.conf; "
        "echo ROOT=$(awk '$2==\"/\"{print $3}' /proc/mounts); "
        "echo $((6*7))-overlay-token > /root/note; sync; exit 3"
    )
    config = GuestConfig(
        entrypoint=["sh", "-c"],  # resolved through PATH inside the image
        cmd=[script],
        env={"FOO": "bar baz"},
        working_dir="/tmp",
        hostname="boot-test",
        network=GuestNetwork.user_mode(),
    )
    with run_guest(system_files, tmp_path / "vm", busybox_ext4, config) as run:
        markers = asyncio.run(
            wait_for_markers(
                run.console_log,
                [Marker.AGENT_READY, Marker.PROGRAM_START, Marker.EXIT],
                BOOT_TIMEOUT,
                run.is_alive,
            )
        )
        assert wait_for_exit(run, 60) == 0, "QEMU must power off by itself after the program exits"
        console = run.console()

    assert markers.exit is not None
    assert markers.exit.code == 3
    assert markers.exit.message == "exited with code 3"
    assert markers.agent_ready_ts is not None and markers.program_start_ts is not None
    lines = console.splitlines()
    assert "hello-from-guest" in lines
    assert lines.index("hello-from-guest") > next(
        i for i, x in enumerate(lines) if "HYPEMAN-PROGRAM-START" in x
    )
    assert "FOO=bar baz" in lines
    assert "PWD=/tmp" in lines
    assert "HOST=boot-test" in lines
    assert "inet 10.0.2.15/24" in console
    assert "default via 10.0.2.2 dev eth0" in console
    assert "nameserver 10.0.2.3" in lines
    assert "ROOT=overlay" in lines
    # The image disk was read-only: the write went to the overlay disk.
    assert b"42-overlay-token" not in busybox_ext4.read_bytes()
    assert b"42-overlay-token" in (tmp_path / "vm" / "overlay.raw").read_bytes()


def test_erofs_image_and_overlay_persist_across_boots(
    system_files: SystemFiles, busybox_tree: Path, tmp_path: Path
) -> None:
    image = make_erofs_image(busybox_tree, tmp_path / "root.erofs")
    overlay = tmp_path / "overlay.raw"
    make_overlay_disk(overlay, 64 << 20)

    first = GuestConfig(
        cmd=["/bin/sh", "-c", "echo kept-across-boots > /etc/state; rm /bin/vi; sync; exit 0"]
    )
    with run_guest(system_files, tmp_path / "vm1", image, first, overlay_disk=overlay) as run:
        markers = asyncio.run(wait_for_markers(run.console_log, [Marker.EXIT], BOOT_TIMEOUT, run.is_alive))
        wait_for_exit(run, 60)
    assert markers.exit is not None and markers.exit.code == 0, run.console()

    second = GuestConfig(cmd=["/bin/sh", "-c", "cat /etc/state; ls /bin/vi || echo vi-gone; exit 0"])
    with run_guest(system_files, tmp_path / "vm2", image, second, overlay_disk=overlay) as run:
        markers = asyncio.run(wait_for_markers(run.console_log, [Marker.EXIT], BOOT_TIMEOUT, run.is_alive))
        wait_for_exit(run, 60)
        console = run.console()
    assert markers.exit is not None and markers.exit.code == 0, console
    assert "kept-across-boots" in console.splitlines()
    assert "vi-gone" in console.splitlines()


def test_garbage_root_disk_reports_error_and_powers_off(system_files: SystemFiles, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(4 << 20))
    config = GuestConfig(cmd=["/bin/sh", "-c", "echo never"])
    with run_guest(system_files, tmp_path / "vm", garbage, config) as run:
        with pytest.raises(GuestBootTimeout) as caught:
            asyncio.run(wait_for_markers(run.console_log, [Marker.AGENT_READY], BOOT_TIMEOUT, run.is_alive))
        assert wait_for_exit(run, 60) == 0
        console = run.console()
    assert "neither ext4" in caught.value.reason
    assert "HYPEMAN-BOOT-ERROR" in caught.value.console_tail
    markers = parse_markers(console)
    assert markers.exit is not None and markers.exit.code == 127
    assert markers.program_start_ts is None


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (GuestConfig(cmd=["/no/such/program"]), "exec /no/such/program: No such file or directory"),
        (GuestConfig(), "no entrypoint or cmd configured"),
        (GuestConfig(cmd=["sh"], working_dir="/missing"), "chdir /missing: No such file or directory"),
    ],
    ids=["missing-executable", "empty-command", "missing-workdir"],
)
def test_program_that_cannot_start_is_reported(
    system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path, config: GuestConfig, expected: str
) -> None:
    with run_guest(system_files, tmp_path / "vm", busybox_ext4, config) as run:
        markers = asyncio.run(wait_for_markers(run.console_log, [Marker.EXIT], BOOT_TIMEOUT, run.is_alive))
        assert wait_for_exit(run, 60) == 0
    assert markers.exit is not None
    assert markers.exit.code == 127
    assert markers.exit.message == expected


def test_killed_program_reports_signal(system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path) -> None:
    # Also: a relative executable path is resolved against the working dir, as in Docker.
    config = GuestConfig(cmd=["./sh", "-c", "kill -9 $$"], working_dir="/bin")
    with run_guest(system_files, tmp_path / "vm", busybox_ext4, config) as run:
        markers = asyncio.run(wait_for_markers(run.console_log, [Marker.EXIT], BOOT_TIMEOUT, run.is_alive))
        wait_for_exit(run, 60)
    assert markers.exit is not None
    assert markers.exit.code == 137
    assert markers.exit.message.startswith("killed by signal 9")


def test_guest_binary_outside_a_vm_only_serves_the_agent(system_files: SystemFiles) -> None:
    """Not PID 1: never try to boot (mounting, powering off) on the host."""
    usage = subprocess.run([str(system_files.guest_binary_path)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2
    assert "usage" in usage.stderr
    missing = subprocess.run(
        [str(system_files.guest_binary_path), "agent", "/nonexistent/port"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    assert missing.returncode == 1
    assert "/nonexistent/port" in missing.stderr


def test_q35_machine_boots_through_virtio_pci(
    system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    config = GuestConfig(
        cmd=[
            "/bin/sh",
            "-c",
            "ls /sys/bus/pci/drivers/virtio-pci/ | grep -c : ; ip -4 addr show eth0; exit 0",
        ],
        network=GuestNetwork.user_mode(),
    )
    with run_guest(system_files, tmp_path / "vm", busybox_ext4, config, machine="q35") as run:
        markers = asyncio.run(
            wait_for_markers(run.console_log, [Marker.AGENT_READY, Marker.EXIT], BOOT_TIMEOUT, run.is_alive)
        )
        assert wait_for_exit(run, 60) == 0
        console = run.console()
    assert markers.exit is not None and markers.exit.code == 0, console
    assert "inet 10.0.2.15/24" in console
