"""Fixtures of the API tests: a real server process with the busybox demo image pushed into its
own registry, shared by a module, and a strict SDK client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypeman import Hypeman

from hypemand.images import demo
from tests.conftest import ServerProcess, start_server, strict_client

# Small guests: TCG on 2 shared cores, and many tests in a row.
SMALL = {"size": "256MB", "overlay_size": "64MB", "vcpus": 1}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module, with the demo image ready; every instance is deleted and the
    server stopped at the end, also when a test failed."""
    root = tmp_path_factory.mktemp("api")
    server = start_server(root / "data", root / "server.log")
    try:
        demo.install(server.base_url, server.token, wait_seconds=300)
        yield server
    finally:
        try:
            with strict_client(server) as client:
                for instance in client.instances.list():
                    client.instances.delete(instance.id)
        finally:
            server.stop()


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client
