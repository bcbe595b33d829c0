"""Fixtures for the guest-agent tests: the real guest binary, run on the host behind a fake chardev,
and (from tests/support/guest.py) what the in-VM tests boot."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypemand.guest.build import build_guest_binary
from hypemand.guest.client import AgentClient
from hypemand.layout import SystemPaths
from tests.support.guest import accel_cache_dir, busybox_ext4, busybox_tree, system_files

from .hostmode import HostAgent

__all__ = ["accel_cache_dir", "busybox_ext4", "busybox_tree", "system_files"]


@pytest.fixture(scope="session")
def guest_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # HYPEMAN_TEST_GUEST_BINARY: run the host-mode tests against another build (e.g. with ASan).
    override = os.environ.get("HYPEMAN_TEST_GUEST_BINARY")
    if override:
        return Path(override)
    return build_guest_binary(SystemPaths(tmp_path_factory.mktemp("system")))


@pytest.fixture
async def host_agent(guest_binary: Path, tmp_path: Path) -> AsyncIterator[HostAgent]:
    agent = HostAgent(guest_binary, tmp_path / "agent.sock")
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


@pytest.fixture
async def client(host_agent: HostAgent) -> AsyncIterator[AgentClient]:
    agent_client = await AgentClient.connect(host_agent.socket_path, timeout=30)
    try:
        yield agent_client
    finally:
        await agent_client.close()
