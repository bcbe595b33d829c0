"""Fixtures of the snapshot schedule tests: real servers whose shortest schedule interval is
lowered to :data:`TEST_MINIMUM` by the test-only ``HYPEMAND_TEST_SCHEDULE_MIN_INTERVAL`` (so a
schedule runs every few seconds instead of every minute), with the busybox demo image, and
strict SDK clients. The harness (tests/support/harness.py) deletes every instance and stops
every server at the end, also after a failure, and fails on what they logged or left."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypeman import Hypeman
from hypeman.types import Snapshot, SnapshotSchedule

from hypemand.images import demo
from tests.support.harness import Harness, ServerProcess, strict_client

TEST_MINIMUM = "1s"
SCHEDULE_ENV = {"HYPEMAND_TEST_SCHEDULE_MIN_INTERVAL": TEST_MINIMUM}
# Small guests: TCG on 2 shared cores, and other engineers' VM tests beside these.
SMALL: dict[str, Any] = {"size": "256MB", "overlay_size": "64MB", "vcpus": 1}
# How long a wait for something the server does by itself may last before the test gives up:
# a bound against hanging, never a claim about speed.
PATIENCE = 240.0
T = TypeVar("T")


def start_server(harness: Harness, data_dir: Path | None = None) -> ServerProcess:
    return harness.start(data_dir, env=SCHEDULE_ENV)


@pytest.fixture(scope="module")
def api(module_harness: Harness) -> ServerProcess:
    server = start_server(module_harness)
    demo.install(server.base_url, server.token, wait_seconds=300)
    return server


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client


def running(sdk: Hypeman, name: str, **extra: Any) -> str:
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **{**SMALL, **extra})
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    return created.id


def eventually(what: str, probe: Callable[[], T | None], patience: float = PATIENCE) -> T:
    """Poll ``probe`` until it returns something (not None). The schedule acts by itself; this
    waits for it to have acted, and fails only if it never does."""
    deadline = time.monotonic() + patience
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting, after {patience:.0f} s, for {what}")
        time.sleep(0.2)  # a poll interval, not a wait for a guest


def scheduled_of(sdk: Hypeman, instance: str, prefix: str) -> list[Snapshot]:
    """The instance's snapshots named by its schedule (prefix-YYYYMMDD-HHMMSS), oldest first."""
    found = [s for s in sdk.snapshots.list(source_instance_id=instance)
             if s.name is not None and s.name.startswith(f"{prefix}-")]
    return sorted(found, key=lambda s: (s.created_at, s.id))


def run_after(sdk: Hypeman, instance: str, since: datetime | None) -> SnapshotSchedule | None:
    """The schedule, once it has recorded a run later than ``since``."""
    schedule = sdk.instances.snapshot_schedule.get(instance)
    if schedule.last_run_at is not None and (since is None or schedule.last_run_at > since):
        return schedule
    return None
