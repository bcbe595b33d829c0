"""The demo image pushed through /v2 boots in a real VM and serves its page (README command 1)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from hypeman import Hypeman

from hypemand.guest.client import AgentClient
from hypemand.guest.config_disk import GuestConfig, GuestNetwork
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.images import demo
from hypemand.system.files import ensure_system_files
from tests.boot.support import run_guest
from tests.conftest import ServerProcess
from tests.registry.conftest import wait_ready

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 180  # TCG on 2 shared cores


def test_demo_image_boots_and_serves_http(server: ServerProcess, sdk: Hypeman, tmp_path: Path) -> None:
    demo.install(server.base_url, server.token, wait_seconds=0)
    image = wait_ready(sdk, demo.DEMO_NAME)
    content = server.data_dir / "images" / "content" / image.digest.removeprefix("sha256:")
    disks = list(content.glob("rootfs.*"))
    assert len(disks) == 1, disks

    system = ensure_system_files(Path(os.environ["HYPEMAND_SYSTEM_DIR"]))
    config = GuestConfig(entrypoint=image.entrypoint or [], cmd=image.cmd or [], env=image.env or {},
                         working_dir=image.working_dir or "/", network=GuestNetwork.user_mode())
    with run_guest(system, tmp_path / "vm", disks[0], config) as run:
        asyncio.run(wait_for_markers(run.console_log, [Marker.PROGRAM_START, Marker.AGENT_READY],
                                     BOOT_TIMEOUT, run.is_alive))
        deadline = time.monotonic() + 60
        while "hypeman demo: busybox httpd listening on port 80" not in run.console():
            assert run.is_alive() and time.monotonic() < deadline, run.console()
            time.sleep(0.2)

        async def fetch_page() -> bytes:
            async with await AgentClient.connect(run.agent_socket, timeout=60) as agent:
                for _ in range(50):  # httpd may still be binding its socket
                    page = await agent.run(["wget", "-qO-", "http://127.0.0.1/"], timeout=30)
                    if page.exit_code == 0:
                        return page.stdout
                    await asyncio.sleep(0.2)
            raise AssertionError(f"httpd never answered: {page}")

        assert b"Hello from a hypeman VM" in asyncio.run(fetch_page())
