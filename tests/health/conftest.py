"""Fixtures of the health check and restart policy tests: one real server per module (the
harness builds its VM network in a namespace of its own), the busybox demo image pushed into
it, a strict SDK client, and each test's instances deleted when it ends (two cores hold few
small guests). ``until`` polls the API for a condition, with a bound that only ends a test that
has failed already."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec
from hypeman.types import Instance

from tests.api.conftest import SMALL, api
from tests.support.harness import ServerProcess, strict_client

__all__ = ["SMALL", "api"]  # the API tests' server fixture and guest size, shared

T = TypeVar("T")

# The bound of a wait for something the server does by itself (a few boots on a loaded machine).
PATIENCE = 240.0


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client
        for instance in client.instances.list():
            client.instances.delete(instance.id)


def until(probe: Callable[[], T | None], what: str, patience: float = PATIENCE) -> T:
    """The first truthy answer of ``probe`` (polled); fails naming ``what`` past ``patience``."""
    deadline = time.monotonic() + patience
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"never saw {what}; last: {last!r}")


def when(sdk: Hypeman, instance: str, condition: Callable[[Instance], bool], what: str,
         patience: float = PATIENCE) -> Instance:
    def probe() -> Instance | None:
        found = sdk.instances.get(instance)
        return found if condition(found) else None
    return until(probe, what, patience)


def health_of(found: Instance) -> str:
    assert found.health_status is not None
    return found.health_status.status


def guest_sh(sdk: Hypeman, instance: str, script: str) -> tuple[int, str]:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    return result.exit_code, result.output.decode(errors="replace")


def boots(sdk: Hypeman, instance: str) -> int:
    """How many times the instance's VMM was launched (its operations log says each)."""
    lines = sdk.instances.logs(instance, source="hypeman", tail=10000)
    return sum("boot: VMM pid" in line for line in lines)
