"""The demo image pushed through /v2 boots in a real VM and serves its page (README command 1)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypeman import Hypeman

from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.images import demo
from hypemand.system.files import ensure_system_files
from tests.registry.conftest import wait_ready
from tests.support.guest import booted_guest, console_text, guest_spec, shared_system_dir, wait_for_console
from tests.support.harness import ServerProcess

pytestmark = pytest.mark.vm


async def test_demo_image_boots_and_serves_http(server: ServerProcess, sdk: Hypeman, tmp_path: Path) -> None:
    await asyncio.to_thread(demo.install, server.base_url, server.token, wait_seconds=0)
    image = await asyncio.to_thread(wait_ready, sdk, demo.DEMO_NAME)
    content = server.data_dir / "images" / "content" / image.digest.removeprefix("sha256:")
    disks = list(content.glob("rootfs.*"))
    assert len(disks) == 1, disks

    system = await asyncio.to_thread(ensure_system_files, shared_system_dir())
    config = GuestConfig(entrypoint=image.entrypoint or [], cmd=image.cmd or [], env=image.env or {},
                         working_dir=image.working_dir or "/")
    spec = guest_spec(tmp_path / "vm", disks[0], config)
    async with booted_guest(QemuHypervisor(state_dir=tmp_path / "hv"), system, spec) as guest:
        await wait_for_console(guest.handle, "hypeman demo: busybox httpd listening on port 80", timeout=60)
        for _ in range(50):  # httpd may still be binding its socket
            page = await guest.agent.run(["wget", "-qO-", "http://127.0.0.1/"], timeout=30)
            if page.exit_code == 0:
                break
            await asyncio.sleep(0.2)
        assert page.exit_code == 0, f"httpd never answered: {page}\n{console_text(guest.handle)}"
    assert b"Hello from a hypeman VM" in page.stdout
