"""Fixtures shared by the whole suite: real `hypemand serve` processes run by one harness
(tests/support/harness.py), and strict SDK clients.

* ``harness``: a :class:`Harness` for one test; ``harness.start(data_dir=None, port=None)``
  starts a server (again on the same data directory: a restart). At the test's teardown every
  instance is deleted, every server stopped, and the test fails if a server logged a traceback
  or an ERROR, or left a process or a file behind.
* ``server`` / ``sdk``: one server of the test's harness, and a strict client for it.
* ``module_harness``: the same for a module's shared servers; its full check runs at the
  module's teardown, and every test's teardown checks the logs for problems new since the
  previous test (so the failing test is named).
* ``@pytest.mark.server_log_allows(r"pattern", ...)``: the only opt-out. Each pattern accepts the
  log records it matches (``re.search`` over the record with its traceback), for that test (or,
  as a module's ``pytestmark``, for the module). Make each pattern name the one expected record.

System files (kernel, initrd, guest binary) are prepared once into a shared system directory
(``HYPEMAND_SYSTEM_DIR``, default ``/var/lib/hypemand/system``, the one `make run` uses) so that
each test's fresh data directory does not download the kernel again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypeman import Hypeman

from tests.support.harness import (
    MARKER,
    REPO,
    SHARED,
    SHARED_SYSTEM_DIR,
    Harness,
    LogAllowance,
    ServerProcess,
    report,
    shared_harness,
    strict_client,
)

os.environ.setdefault("HYPEMAND_SYSTEM_DIR", str(SHARED_SYSTEM_DIR))

__all__ = ["REPO", "SHARED_SYSTEM_DIR", "ServerProcess", "strict_client"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(*patterns): server log records (regular expressions) this test provokes on "
        "purpose; the harness accepts those records and no others")


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    own = Harness(tmp_path / "harness", LogAllowance.of(request.node))
    try:
        yield own
    finally:
        problems = own.finish()
    report(problems, "the servers of this test left problems")


@pytest.fixture(scope="module")
def module_harness(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with shared_harness(tmp_path_factory.mktemp("module-harness"), request.node) as shared:
        yield shared


@pytest.fixture(autouse=True)
def _shared_server_logs_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the logs of shared servers hold no problem new since the last test."""
    yield
    if SHARED:
        allowance = LogAllowance.of(request.node)
        report([p for shared in SHARED for p in shared.check_new_log(allowance)],
               "a shared server logged problems during this test")


@pytest.fixture
def server(harness: Harness) -> ServerProcess:
    return harness.start()


@pytest.fixture
def sdk(server: ServerProcess) -> Iterator[Hypeman]:
    client = strict_client(server)
    try:
        yield client
    finally:
        client.close()
