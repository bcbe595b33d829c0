"""Helpers for the /v2 registry tests: an authenticated httpx client and image-ready polling."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman, NotFoundError
from hypeman.types import Image

from hypemand.images import demo
from tests.support.harness import ServerProcess

READY_TIMEOUT = 600  # conversion shares 2 cores with other test suites


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry(server: ServerProcess) -> Iterator[httpx.Client]:
    """Talks to the server's /v2 with the API token as a Bearer token."""
    with httpx.Client(base_url=server.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {server.token}"}) as client:
        yield client


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo image (Debian busybox-static) as an OCI layout, tagged ``latest``."""
    return demo.build_layout(tmp_path_factory.mktemp("busybox"))


def wait_ready(sdk: Hypeman, name: str, timeout: float = READY_TIMEOUT) -> Image:
    """Poll the image through the SDK until it is ready; fail on ``failed`` or timeout."""
    deadline = time.monotonic() + timeout
    last: Image | None = None
    while time.monotonic() < deadline:
        try:
            last = sdk.images.get(name)
        except NotFoundError:
            last = None
        if last is not None and last.status == "ready":
            return last
        assert last is None or last.status != "failed", f"conversion failed: {last.error}"
        time.sleep(1)
    raise AssertionError(f"{name} not ready after {timeout} s (last: {last})")
