"""Real boots of the C init: the system files and a busybox image under QEMU (microvm, TCG),
launched through the instance boot path (``GuestSpec`` -> disks -> ``VMConfig`` -> QEMU backend).

Guests whose program ends are launched without ``boot_guest``'s wait and watched until QEMU
exits by itself: the init must power off after every outcome.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import GuestBootTimeout, Marker, parse_markers
from hypemand.hypervisor.base import ShutdownOutcome
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.layout import OVERLAY_DISK
from hypemand.system.files import SystemFiles
from tests.support.guest import (
    booted_guest,
    console_size,
    console_text,
    guest_spec,
    launched_guest,
    make_erofs_image,
    wait_for_console,
    wait_for_guest_markers,
    wait_for_power_off,
)

pytestmark = pytest.mark.vm


async def test_program_runs_with_its_config_and_exit_code_is_reported(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
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
    )
    spec = guest_spec(tmp_path / "vm", busybox_ext4, config)  # user-mode network by default
    async with launched_guest(hypervisor, system_files, spec) as vm:
        markers = await wait_for_power_off(vm)
        console = console_text(vm)

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
    image_bytes = await asyncio.to_thread(busybox_ext4.read_bytes)
    overlay_bytes = await asyncio.to_thread((spec.directory / OVERLAY_DISK).read_bytes)
    assert b"42-overlay-token" not in image_bytes
    assert b"42-overlay-token" in overlay_bytes


async def test_erofs_image_and_overlay_persist_across_boots(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_tree: Path, tmp_path: Path
) -> None:
    image = make_erofs_image(busybox_tree, tmp_path / "root.erofs")
    directory = tmp_path / "vm"  # the same VM directory, so the same overlay disk, booted twice

    first = GuestConfig(
        cmd=["/bin/sh", "-c", "echo kept-across-boots > /etc/state; rm /bin/vi; sync; exit 0"]
    )
    async with launched_guest(hypervisor, system_files, guest_spec(directory, image, first)) as vm:
        markers = await wait_for_power_off(vm)
        offset = console_size(vm.console_log_path)
    assert markers.exit is not None and markers.exit.code == 0, console_text(vm)

    second = GuestConfig(cmd=["/bin/sh", "-c", "cat /etc/state; ls /bin/vi || echo vi-gone; exit 0"])
    async with launched_guest(hypervisor, system_files, guest_spec(directory, image, second)) as vm:
        markers = await wait_for_power_off(vm, offset=offset)
        console = console_text(vm)[offset:]
    assert markers.exit is not None and markers.exit.code == 0, console
    assert "kept-across-boots" in console.splitlines()
    assert "vi-gone" in console.splitlines()


async def test_garbage_root_disk_reports_error_and_powers_off(
    hypervisor: QemuHypervisor, system_files: SystemFiles, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(4 << 20))
    config = GuestConfig(cmd=["/bin/sh", "-c", "echo never"])
    async with launched_guest(hypervisor, system_files, guest_spec(tmp_path / "vm", garbage, config)) as vm:
        with pytest.raises(GuestBootTimeout) as caught:
            await wait_for_guest_markers(vm, [Marker.AGENT_READY])
        assert await vm.wait_exit(60), "the guest must power off by itself"
        console = console_text(vm)
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
async def test_program_that_cannot_start_is_reported(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
    config: GuestConfig,
    expected: str,
) -> None:
    spec = guest_spec(tmp_path / "vm", busybox_ext4, config)
    async with launched_guest(hypervisor, system_files, spec) as vm:
        markers = await wait_for_power_off(vm)
    assert markers.exit is not None
    assert markers.exit.code == 127
    assert markers.exit.message == expected


async def test_killed_program_reports_signal(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    # Also: a relative executable path is resolved against the working dir, as in Docker.
    config = GuestConfig(cmd=["./sh", "-c", "kill -9 $$"], working_dir="/bin")
    spec = guest_spec(tmp_path / "vm", busybox_ext4, config)
    async with launched_guest(hypervisor, system_files, spec) as vm:
        markers = await wait_for_power_off(vm)
    assert markers.exit is not None
    assert markers.exit.code == 137
    assert markers.exit.message.startswith("killed by signal 9")


async def test_power_button_kills_a_program_that_ignores_sigterm(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    """The graceful stop has a limit: SIGTERM, 5 s of grace, then SIGKILL and a power-off."""
    config = GuestConfig(
        entrypoint=["/bin/sh", "-c"],
        cmd=["trap '' TERM; echo ignoring-term; while true; do sleep 0.5; done"],
    )
    spec = guest_spec(tmp_path / "vm", busybox_ext4, config)
    async with booted_guest(hypervisor, system_files, spec) as guest:
        await wait_for_console(guest.handle, "ignoring-term")
        outcome = await guest.handle.shutdown(timeout=60)
        console = console_text(guest.handle)
    assert outcome is ShutdownOutcome.GUEST_POWEROFF, console
    assert "hypeman-init: power button: stopping the program" in console
    assert "did not stop within 5 s; sending SIGKILL" in console
    markers = parse_markers(console)
    assert markers.exit is not None, console
    assert (markers.exit.code, markers.exit.message) == (137, "killed by signal 9 (Killed)")


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
