"""The project's real boot path (system kernel + initrd + guest init) launched through the backend.

Disks are found by serial (hm-root read-only, hm-overlay, hm-config), the guest init runs the
image's program, and a port forward reaches it: the backend's command line fits the guest side.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

import pytest

from hypemand.guest.config_disk import GuestConfig, GuestNetwork, make_overlay_disk, write_config_disk
from hypemand.hypervisor.base import Board, DiskConfig, PortForward, ShutdownOutcome, VMConfig, VMStatus
from hypemand.system.files import SystemFiles, ensure_system_files
from tests.boot.support import make_busybox_tree, make_ext4_image
from tests.hypervisor.conftest import Launcher, free_port, wait_for_console

pytestmark = pytest.mark.vm

PROGRAM_LINE = "HM-SYSTEM-PROGRAM-UP"
BODY = "hello-from-the-system-boot-path"


@pytest.fixture(scope="session")
def system_files() -> SystemFiles:
    return ensure_system_files(Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system")))


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = make_busybox_tree(tmp_path_factory.mktemp("busybox") / "tree")
    return make_ext4_image(tree, tmp_path_factory.mktemp("images") / "busybox.ext4")


@pytest.mark.parametrize("board", [Board.QEMU_MICROVM, Board.QEMU])
async def test_system_files_boot_through_the_backend(
    board: Board, launch: Launcher, system_files: SystemFiles, busybox_root: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "vm"
    directory.mkdir()
    overlay = directory / "overlay.raw"
    config_disk = directory / "config.raw"
    make_overlay_disk(overlay, 64 << 20)
    write_config_disk(
        config_disk,
        GuestConfig(
            entrypoint=["/bin/sh", "-c"],
            cmd=[
                f"mkdir -p /tmp/www && echo {BODY} > /tmp/www/index.html && echo {PROGRAM_LINE} "
                "&& exec httpd -f -p 80 -h /tmp/www"
            ],
            network=GuestNetwork.user_mode(),
        ),
    )
    port = free_port()
    vm = await launch(
        VMConfig(
            vm_id="sysboot",
            directory=directory,
            board=board,
            kernel=system_files.kernel_path,
            initrd=system_files.initrd_path,
            disks=[
                DiskConfig(path=busybox_root, readonly=True, serial="hm-root"),
                DiskConfig(path=overlay, serial="hm-overlay"),
                DiskConfig(path=config_disk, readonly=True, serial="hm-config"),
            ],
            user_network=True,
            port_forwards=[PortForward(host_port=port, guest_port=80)],
        )
    )
    await wait_for_console(vm, PROGRAM_LINE)
    assert await vm.status() is VMStatus.RUNNING

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return str(response.read().decode())

    body = ""
    for _ in range(50):
        try:
            body = await asyncio.to_thread(fetch)
            break
        except OSError:
            await asyncio.sleep(0.2)
    assert body.strip() == BODY

    outcome = await vm.shutdown(timeout=5)
    assert outcome in (ShutdownOutcome.GUEST_POWEROFF, ShutdownOutcome.VMM_QUIT)
    assert not vm.is_alive()
