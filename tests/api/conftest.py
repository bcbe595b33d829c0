"""Fixtures of the API tests: a real server process with the busybox demo image pushed into its
own registry, shared by a module through the module's harness (tests/support/harness.py), and a
strict SDK client for it. The harness deletes every instance and stops the server at the end,
also when a test failed, and fails on what the server logged or left behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypeman import Hypeman

from hypemand.images import demo
from tests.support.harness import Harness, ServerProcess, strict_client

# Small guests: TCG on 2 shared cores, and many tests in a row.
SMALL = {"size": "256MB", "overlay_size": "64MB", "vcpus": 1}


@pytest.fixture(scope="module")
def api(module_harness: Harness) -> ServerProcess:
    """One server for the module, with the demo image ready."""
    server = module_harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    return server


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client
