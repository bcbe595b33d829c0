"""The memory reclaim's plan (policies/reclaim_plan.py): shares, floors, steps, the request."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hypemand.policies.reclaim_plan import (
    FLOOR_MIN_BYTES,
    MIB,
    PAGE,
    STEP_BYTES,
    Candidate,
    MemoryReclaimRequest,
    plan_targets,
    pressure_state,
    protected_floor,
    stepped,
)

GIB = 1 << 30


def vm(name: str, assigned: int, current: int | None = None) -> Candidate:
    return Candidate(name, assigned, assigned if current is None else current)


def reclaimed(candidates: list[Candidate], targets: dict[str, int]) -> dict[str, int]:
    return {c.instance_id: c.assigned_bytes - targets[c.instance_id] for c in candidates}


def test_the_floor_is_half_or_128_mib_and_never_more_than_the_vm() -> None:
    assert protected_floor(4 * GIB) == 2 * GIB
    assert protected_floor(256 * MIB) == FLOOR_MIN_BYTES == 128 * MIB
    assert protected_floor(128 * MIB) == 128 * MIB
    assert protected_floor(64 * MIB) == 64 * MIB  # a VM smaller than the minimum gives nothing
    assert protected_floor(1000 * MIB + PAGE) % PAGE == 0


def test_shares_follow_assigned_memory() -> None:
    vms = [vm("a", 1 * GIB), vm("b", 3 * GIB)]
    taken = reclaimed(vms, plan_targets(vms, 1 * GIB))
    assert taken == {"a": 256 * MIB, "b": 768 * MIB}
    assert sum(taken.values()) == 1 * GIB


def test_a_vm_at_its_floor_leaves_the_rest_to_the_others() -> None:
    vms = [vm("small", 200 * MIB), vm("big", 4 * GIB)]  # small: 72 MiB above its 128 MiB floor
    # Of 1 GiB small's share (~48 MiB) fits above its floor; of 2 GiB (~95 MiB) it does not, and
    # big takes the difference.
    share = reclaimed(vms, plan_targets(vms, 1 * GIB))["small"]
    assert abs(share - 1 * GIB * 200 // 4296) <= PAGE  # its share, to a page (pages left over)
    taken = reclaimed(vms, plan_targets(vms, 2 * GIB))
    assert taken == {"small": 72 * MIB, "big": 2 * GIB - 72 * MIB}
    # More than every room: everything above the floors.
    everything = reclaimed(vms, plan_targets(vms, 100 * GIB))
    assert everything == {"small": 72 * MIB, "big": 2 * GIB}


def test_the_request_is_the_total_in_effect_and_zero_gives_everything_back() -> None:
    vms = [vm("a", 1 * GIB, current=700 * MIB), vm("b", 1 * GIB, current=900 * MIB)]
    # Counted from the full sizes, whatever the balloons hold now.
    assert reclaimed(vms, plan_targets(vms, 200 * MIB)) == {"a": 100 * MIB, "b": 100 * MIB}
    assert plan_targets(vms, 0) == {"a": 1 * GIB, "b": 1 * GIB}
    assert plan_targets([], 1 * GIB) == {}


def test_pages_left_over_by_the_shares_are_placed_exactly() -> None:
    vms = [vm(f"v{i}", 1 * GIB) for i in range(3)]
    want = 7 * PAGE  # 7 pages among 3 equal VMs
    taken = reclaimed(vms, plan_targets(vms, want))
    assert sum(taken.values()) == want and all(t % PAGE == 0 for t in taken.values())
    assert sorted(taken.values()) == [2 * PAGE, 2 * PAGE, 3 * PAGE]
    odd = reclaimed(vms, plan_targets(vms, 10 * PAGE + 123))  # not whole pages: rounded down
    assert sum(odd.values()) == 10 * PAGE


def test_one_request_moves_a_vm_at_most_one_step() -> None:
    assert stepped(8 * GIB, 2 * GIB) == 8 * GIB - STEP_BYTES
    assert stepped(2 * GIB, 8 * GIB) == 2 * GIB + STEP_BYTES
    assert stepped(2 * GIB, 2 * GIB + MIB) == 2 * GIB + MIB


def test_pressure_is_less_than_a_tenth_available() -> None:
    assert pressure_state(9, 100) == "pressure"
    assert pressure_state(10, 100) == "healthy"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reclaim_bytes": -1}, "reclaim_bytes"),
        ({}, "reclaim_bytes"),
        ({"reclaim_bytes": 1, "hold_for": "soon"}, "hold_for"),
        ({"reclaim_bytes": 1, "hold_for": "0s"}, "hold_for"),
        ({"reclaim_bytes": 1, "hold_for": "-5m"}, "hold_for"),
        ({"reclaim_bytes": 1, "reason": "x" * 2000}, "reason"),
        ({"reclaim_bytes": 1, "surprise": True}, "surprise"),
    ],
)
def test_bad_requests_name_their_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        MemoryReclaimRequest.model_validate(body)


def test_hold_for_defaults_to_five_minutes() -> None:
    assert MemoryReclaimRequest(reclaim_bytes=0).hold_seconds == 300
    assert MemoryReclaimRequest(reclaim_bytes=0, hold_for="1h30m").hold_seconds == 5400
