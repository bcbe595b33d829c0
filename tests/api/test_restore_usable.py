"""``Running`` after a restore or a fork means usable, through the official SDK in strict mode:
the guest agent has answered and the guest's clock is set before the call answers, so an exec
sent right after it goes straight through and sees the right time. What is asserted is the
order of events (the instance's operations log, read before any exec) and what the guest
reports, never how long anything took (that is bench/snapshots.py's). And the forks that go
side by side past a snapshot's preparation once it was made ready still see a file changed
after that."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypeman import ConflictError, Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.api.conftest import SMALL
from tests.support.harness import ServerProcess

pytestmark = pytest.mark.vm

IDLE = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 1; done"]}
LINKED = "restore: guest agent answered, guest clock set"
# Longer than the clock check's tolerance: a clock that was not set is visibly behind.
ASLEEP_SECONDS = 5.0
CLOCK_TOLERANCE_SECONDS = 2.0


def running(sdk: Hypeman, name: str, **extra: object) -> str:
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **{**SMALL, **IDLE, **extra})  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    return created.id


def operations(sdk: Hypeman, instance: str) -> list[str]:
    return list(sdk.instances.logs(instance, source="hypeman", tail=50))


def after_last(lines: list[str], marker: str) -> list[str]:
    """The lines after the last one containing ``marker``."""
    starts = [index for index, line in enumerate(lines) if marker in line]
    assert starts, f"no {marker!r} in {lines}"
    return lines[starts[-1] + 1 :]


def guest_sh(sdk: Hypeman, instance: str, script: str) -> str:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    assert result.exit_code == 0, result
    return result.output.decode()


def assert_clock_is_hosts(guest_epoch_seconds: str) -> None:
    assert abs(int(guest_epoch_seconds) - time.time()) <= CLOCK_TOLERANCE_SECONDS, guest_epoch_seconds


def test_restore_answers_running_once_the_agent_answered_and_the_clock_is_set(sdk: Hypeman) -> None:
    instance = running(sdk, "usable")
    guest_sh(sdk, instance, "true")  # the agent was linked before the standby
    for cycle in range(3):
        assert sdk.instances.standby(instance).state == "Standby"
        time.sleep(ASLEEP_SECONDS)  # part of the test: the guest's wall clock falls behind

        assert sdk.instances.restore(instance).state == "Running"
        # Read before anything else touches the instance: the restore itself linked the agent
        # and set the clock, before it answered.
        restored = after_last(operations(sdk, instance), "restore requested")
        assert any(LINKED in line for line in restored), (cycle, restored)
        # The very next call is an exec: it goes through, on a guest whose clock is right.
        assert_clock_is_hosts(guest_sh(sdk, instance, "date +%s"))
    sdk.instances.delete(instance)


def test_fork_answers_running_with_its_identity_and_the_clock_set(sdk: Hypeman) -> None:
    source = running(sdk, "fork-src")
    guest_sh(sdk, source, "true")
    sdk.instances.standby(source)
    snapshot = sdk.instances.snapshots.create(source, kind="Standby")
    time.sleep(ASLEEP_SECONDS)  # part of the test: the saved guest's wall clock falls behind

    fork = sdk.snapshots.fork(snapshot.id, name="fork-usable")
    assert fork.state == "Running"
    assert any(LINKED in line for line in operations(sdk, fork.id))
    hostname, epoch = guest_sh(sdk, fork.id, "hostname; date +%s").split()
    assert hostname == "fork-usable"
    assert_clock_is_hosts(epoch)
    sdk.instances.delete(fork.id)
    sdk.instances.delete(source)
    sdk.snapshots.delete(snapshot.id)


def test_restore_of_an_instance_without_agent_does_not_link_one(sdk: Hypeman, api: ServerProcess) -> None:
    instance = running(sdk, "no-agent", skip_guest_agent=True)
    assert sdk.instances.standby(instance).state == "Standby"
    assert sdk.instances.restore(instance).state == "Running"
    restored = after_last(operations(sdk, instance), "restore requested")
    assert not any(LINKED in line for line in restored), restored
    assert "did not answer after the restore" not in api.log()
    sdk.instances.delete(instance)


def flip_byte(path: Path, offset: int) -> int:
    """Invert one byte in place (its mtime moves, as any write's does); returns the old value."""
    fd = os.open(path, os.O_RDWR)
    try:
        (old,) = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return old


def test_a_snapshot_changed_after_a_fork_is_checked_again(sdk: Hypeman, api: ServerProcess) -> None:
    source = running(sdk, "ready-src")
    guest_sh(sdk, source, "true")
    snapshot = sdk.instances.snapshots.create(source, kind="Standby")
    sdk.instances.delete(source)
    first = sdk.snapshots.fork(snapshot.id, name="ready-1")  # the snapshot's files are made ready
    assert first.state == "Running"
    sdk.instances.delete(first.id)

    memory = api.data_dir / "snapshots" / snapshot.id / "guest" / "memory.ram"
    offset = memory.stat().st_size // 3
    old = flip_byte(memory, offset)
    with pytest.raises(ConflictError) as refused:
        sdk.snapshots.fork(snapshot.id, name="ready-2")
    assert refused.value.body["code"] == "snapshot_corrupt"  # type: ignore[index]
    assert [i.name for i in sdk.instances.list()] == []

    assert flip_byte(memory, offset) == old ^ 0xFF  # back to the byte it was
    again = sdk.snapshots.fork(snapshot.id, name="ready-3")
    assert again.state == "Running"
    assert guest_sh(sdk, again.id, "hostname").strip() == "ready-3"
    sdk.instances.delete(again.id)
    sdk.snapshots.delete(snapshot.id)
