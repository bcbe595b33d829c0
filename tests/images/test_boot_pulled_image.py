"""The image pipeline meets the boot path: a disk pulled through the API boots as a VM and runs
the image's own entrypoint, cmd, env and working directory."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.images.service import ImageService
from hypemand.instances.boot import GuestSpec, boot_guest
from hypemand.layout import DataLayout
from hypemand.system.files import ensure_system_files
from tests.images.conftest import PushedRegistry, wait_for_status
from tests.support.harness import SHARED_SYSTEM_DIR, Harness, strict_client

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("disk_format", ["ext4", "erofs"])
async def test_pulled_image_boots_and_runs_its_config(
    local_registry: PushedRegistry, tmp_path: Path, harness: Harness, disk_format: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYPEMAND_IMAGE_FORMAT", disk_format)
    server = harness.start()
    try:
        sdk = strict_client(server)
        name = local_registry.ref("test/single:1")
        sdk.images.create(name=name)
        image = wait_for_status(sdk, name)
        assert image.status == "ready", image.error
    finally:
        server.stop()
    ready = await ImageService(DataLayout(server.data_dir)).get_ready_by_digest(image.digest)
    assert ready.disk_format == disk_format
    config = GuestConfig(entrypoint=ready.entrypoint or [], cmd=ready.cmd or [], env=ready.env,
                         working_dir=ready.working_dir or "/")
    spec = GuestSpec(vm_id="pulled", directory=tmp_path / "vm", root_disk=ready.disk_path, guest=config)
    system = ensure_system_files(SHARED_SYSTEM_DIR)
    guest = await boot_guest(QemuHypervisor(state_dir=tmp_path / "hv"), system, spec)
    try:
        # The image runs `sh -c 'cat /etc/motd'` (entrypoint + cmd) and exits.
        markers = await wait_for_markers(guest.handle.console_log_path, {Marker.EXIT}, 60, lambda: True)
        assert markers.exit is not None and markers.exit.code == 0, markers
        console = guest.handle.console_log_path.read_text()
        assert "hello from single" in console
    finally:
        with contextlib.suppress(Exception):
            await guest.handle.kill()
        await guest.close()
