"""``POST /resources/memory/reclaim`` on real VMs through the official SDK in strict mode.

What the guest itself sees is the judge: its balloon's size from ``/proc/vmstat`` (pages the
balloon driver took minus those it gave back) and its ``MemAvailable``. With deflate-on-oom the
guest counts the balloon as used memory, so ``MemTotal`` does not move; ``MemAvailable`` does.
A dry run plans and changes nothing; an apply inflates; the balloon survives a standby and a
restore; the hold's end deflates it; a fork (whose RAM file is its snapshot's) is ``unsupported``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypeman import BadRequestError, Hypeman, NotFoundError
from hypeman.lib.exec import exec as sdk_exec
from hypeman.types import MemoryReclaimAction, MemoryReclaimResponse

from hypemand.images import demo
from tests.api.conftest import SMALL

pytestmark = pytest.mark.vm

MIB = 1 << 20
ASSIGNED = 256 * MIB  # SMALL's size: its floor is 128 MiB
RECLAIM = 64 * MIB
IDLE = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 1; done"]}
# The guest inflates a few MiB per second under TCG on a loaded host; this only bounds a wait.
GUEST_LIMIT = 240.0


def running(sdk: Hypeman, name: str) -> str:
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **{**SMALL, **IDLE})  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    return created.id


def guest_sh(sdk: Hypeman, instance: str, script: str) -> str:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    assert result.exit_code == 0, result
    return result.output.decode()


def balloon_bytes(sdk: Hypeman, instance: str) -> int:
    """What the guest's balloon holds, as the guest counts it."""
    lines = guest_sh(sdk, instance, "grep ^balloon_ /proc/vmstat").splitlines()
    counters = dict(line.split() for line in lines)
    return (int(counters["balloon_inflate"]) - int(counters["balloon_deflate"])) * 4096


def mem_available(sdk: Hypeman, instance: str) -> int:
    return int(guest_sh(sdk, instance, "awk '/^MemAvailable:/ {print $2}' /proc/meminfo")) * 1024


def until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + GUEST_LIMIT
    while not check():
        assert time.monotonic() < deadline, f"the guest never got there: {what}"
        time.sleep(0.5)


def action_of(response: MemoryReclaimResponse, instance: str) -> MemoryReclaimAction:
    (action,) = [a for a in response.actions if a.instance_id == instance]
    return action


def test_capabilities_offer_balloon_control_and_bad_requests_are_400s(sdk: Hypeman) -> None:
    runtimes = {runtime.name: runtime for runtime in sdk.capabilities.get().runtimes}
    assert all("balloon-control" in runtimes[board].features for board in ("qemu-microvm", "qemu"))
    for body, field in (({"reclaim_bytes": -1}, "reclaim_bytes"), ({"reclaim_bytes": 1, "hold_for": "soon"},
                        "hold_for"), ({"reclaim_bytes": 1, "hold_for": "0s"}, "hold_for")):
        with pytest.raises(BadRequestError) as info:
            sdk.resources.reclaim_memory(**body)
        assert info.value.status_code == 400
        assert isinstance(info.value.body, dict) and field in info.value.body["message"], info.value.body


def test_dry_run_plans_apply_inflates_across_a_standby_and_the_hold_end_deflates(sdk: Hypeman) -> None:
    instance = running(sdk, "reclaimed")
    try:
        guest_sh(sdk, instance, "true")
        assert balloon_bytes(sdk, instance) == 0

        # A dry run: the plan, nothing else.
        planned = sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, dry_run=True, reason="test: plan")
        assert planned.requested_reclaim_bytes == RECLAIM and planned.hold_until is None
        assert planned.host_available_bytes > 0 and planned.host_pressure_state in ("healthy", "pressure")
        action = action_of(planned, instance)
        assert (action.status, action.hypervisor) == ("planned", "qemu-microvm")
        assert action.instance_name == "reclaimed"
        assert action.assigned_memory_bytes == action.previous_target_guest_memory_bytes == ASSIGNED
        assert action.protected_floor_bytes == 128 * MIB
        assert action.planned_target_guest_memory_bytes == ASSIGNED - RECLAIM
        assert action.target_guest_memory_bytes == ASSIGNED and action.applied_reclaim_bytes == 0
        assert planned.planned_reclaim_bytes == RECLAIM and planned.applied_reclaim_bytes == 0
        # QEMU's balloon (query-balloon, read by the next plan) and the guest's: untouched.
        again = action_of(sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, dry_run=True), instance)
        assert again.previous_target_guest_memory_bytes == ASSIGNED
        assert balloon_bytes(sdk, instance) == 0

        # Applied, and held for long enough to look at it.
        available_before = mem_available(sdk, instance)
        applied = sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, hold_for="10m", reason="test: apply")
        action = action_of(applied, instance)
        assert action.status == "applied" and action.error is None
        assert action.target_guest_memory_bytes == ASSIGNED - RECLAIM
        assert action.applied_reclaim_bytes == RECLAIM
        assert applied.applied_reclaim_bytes >= RECLAIM
        assert applied.hold_until is not None
        assert applied.hold_until - datetime.now(UTC) > timedelta(minutes=9)
        until("the balloon holds what was reclaimed", lambda: balloon_bytes(sdk, instance) == RECLAIM)
        assert available_before - mem_available(sdk, instance) > RECLAIM * 3 // 4

        # Asking again for the same is no change (the request is the total in effect).
        same = action_of(sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, hold_for="10m"), instance)
        assert (same.status, same.previous_target_guest_memory_bytes) == ("unchanged", ASSIGNED - RECLAIM)

        # The balloon is device state: a standby and a restore keep it, and the VM works.
        assert sdk.instances.standby(instance).state == "Standby"
        assert sdk.instances.restore(instance).state == "Running"
        assert balloon_bytes(sdk, instance) == RECLAIM
        after_restore = action_of(sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, dry_run=True), instance)
        assert after_restore.previous_target_guest_memory_bytes == ASSIGNED - RECLAIM  # read from QEMU

        # A short hold replaces the long one; its end gives the memory back.
        short = sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, hold_for="2s", reason="test: expire")
        assert short.hold_until is not None and short.hold_until - datetime.now(UTC) < timedelta(seconds=3)
        until("the hold's end deflated the balloon", lambda: balloon_bytes(sdk, instance) == 0)
        after = action_of(sdk.resources.reclaim_memory(reclaim_bytes=0, dry_run=True), instance)
        assert after.previous_target_guest_memory_bytes == ASSIGNED and after.status == "unchanged"
    finally:
        sdk.instances.delete(instance)


def test_a_fork_is_unsupported_and_reclaim_zero_ends_the_hold(sdk: Hypeman) -> None:
    source = running(sdk, "fork-source")
    made: list[Callable[[], object]] = [lambda: sdk.instances.delete(source)]
    try:
        guest_sh(sdk, source, "true")
        sdk.instances.standby(source)
        snapshot = sdk.instances.snapshots.create(source, kind="Standby")
        made.append(lambda: sdk.snapshots.delete(snapshot.id))
        fork = sdk.snapshots.fork(snapshot.id, name="the-fork", target_state="Running")
        made.append(lambda: sdk.instances.delete(fork.id))
        assert fork.state == "Running"
        sdk.instances.restore(source)

        response = sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, hold_for="10m")
        forked = action_of(response, fork.id)
        assert forked.status == "unsupported" and forked.error is not None and "fork" in forked.error
        assert forked.target_guest_memory_bytes == ASSIGNED and forked.applied_reclaim_bytes == 0
        # The whole request went to the VM that can take it (within its floor).
        assert action_of(response, source).target_guest_memory_bytes == ASSIGNED - RECLAIM
        until("the source's balloon inflated", lambda: balloon_bytes(sdk, source) == RECLAIM)
        assert balloon_bytes(sdk, fork.id) == 0

        # Zero: everything back at once, and no hold any more.
        released = sdk.resources.reclaim_memory(reclaim_bytes=0)
        assert released.hold_until is None
        assert action_of(released, source).status == "applied"
        until("the source's balloon deflated", lambda: balloon_bytes(sdk, source) == 0)
    finally:
        for undo in reversed(made):
            with contextlib.suppress(NotFoundError):
                undo()
