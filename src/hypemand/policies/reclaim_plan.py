"""Memory reclaim (hypeman-behaviour §5.7) in the SDK's shapes, and its plan: pure, unit-tested.

``POST /resources/memory/reclaim`` asks the running VMs to give ``reclaim_bytes`` of guest memory
back to the host through their balloons. The plan:

- **Proportional to assigned memory.** Each VM gives a share of the request proportional to the
  memory it was given; a VM that reaches its floor gives no more, and the rest is shared among the
  others the same way (so the request is met whenever the VMs' room above their floors allows).
  The request is the total reclaim *in effect*, counted from each VM's full size: asking twice
  for 512 MiB reclaims 512 MiB, not 1 GiB, and asking for 0 gives everything back.
- **A protected floor per VM**: the larger of 128 MiB and half of its memory (never more than
  all of it). Half, because a reclaim is the host's emergency, not a resize: the guest keeps room
  for what it was running; 128 MiB, because below that a small Linux guest with a program starts
  to OOM (the balloon's deflate-on-OOM would take pages back then anyway, see qemu_cmdline).
- **A per-VM step**: one request moves a VM's target by at most 1 GiB (either way). A guest
  inflates at tens of MiB/s under TCG (bench.balloon), and one big step on a busy guest starves
  it at once. ``planned_target_guest_memory_bytes`` is the stepped target (what this request
  sets); a request beyond the step is met by asking again.

Targets are whole 4 KiB pages (the balloon's unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hypemand.policies.models import duration_seconds
from hypemand.wire import WireModel

MIB = 1 << 20
PAGE = 4096
FLOOR_MIN_BYTES = 128 * MIB
FLOOR_SHARE = 0.5
STEP_BYTES = 1 << 30
DEFAULT_HOLD = "5m"
MAX_REASON_CHARS = 1024
# The host is under pressure when less than this share of its memory is available (MemAvailable).
PRESSURE_AVAILABLE_SHARE = 0.10

# Per-VM statuses (the SDK's ``status`` is a free string; these are the reference's).
APPLIED = "applied"  # the new target was set
PLANNED = "planned"  # dry run: this target would be set
UNCHANGED = "unchanged"  # the VM is already at its planned target
UNSUPPORTED = "unsupported"  # the VM has no balloon that can be inflated
SKIPPED = "skipped"  # busy (another operation held it) or it stopped running meanwhile
ERROR = "error"  # setting the target failed

Hypervisor = Literal["cloud-hypervisor", "firecracker", "qemu", "qemu-microvm", "vz"]


def hold_seconds(value: str) -> float:
    """``hold_for`` in seconds: a positive Go duration (ValueError naming the field)."""
    return duration_seconds(value, "hold_for")


class MemoryReclaimRequest(BaseModel):
    """The SDK's ``ResourceReclaimMemoryParams``."""

    model_config = ConfigDict(extra="forbid")

    reclaim_bytes: int = Field(ge=0, le=2**63 - 1)
    dry_run: bool = False
    hold_for: str | None = None  # Go duration; None: DEFAULT_HOLD
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)

    @field_validator("hold_for")
    @classmethod
    def _hold_ok(cls, value: str | None) -> str | None:
        if value is not None:
            hold_seconds(value)
        return value

    @property
    def hold_seconds(self) -> float:
        return hold_seconds(self.hold_for or DEFAULT_HOLD)


class MemoryReclaimAction(WireModel):
    """The SDK's ``MemoryReclaimAction``: one running VM's part."""

    instance_id: str
    instance_name: str
    hypervisor: Hypervisor
    assigned_memory_bytes: int
    protected_floor_bytes: int
    previous_target_guest_memory_bytes: int  # the guest's target before this request
    planned_target_guest_memory_bytes: int  # what this request sets (dry run: would set)
    target_guest_memory_bytes: int  # the target after this request
    applied_reclaim_bytes: int  # assigned - target: the reclaim in effect after this request
    status: str
    error: str | None = None


class MemoryReclaimResponse(WireModel):
    """The SDK's ``MemoryReclaimResponse``."""

    requested_reclaim_bytes: int
    planned_reclaim_bytes: int  # the sum of (assigned - planned target)
    applied_reclaim_bytes: int  # the sum of (assigned - target)
    host_available_bytes: int  # MemAvailable
    host_pressure_state: Literal["healthy", "pressure"]
    hold_until: datetime | None = None  # when the current hold ends and the balloons deflate
    actions: list[MemoryReclaimAction]


@dataclass(frozen=True)
class Candidate:
    """A running VM whose balloon can be inflated."""

    instance_id: str
    assigned_bytes: int
    current_bytes: int  # its guest memory target now


def protected_floor(assigned_bytes: int) -> int:
    """The memory a reclaim leaves a VM: max(128 MiB, half of it), in whole pages, at most all."""
    floor = max(FLOOR_MIN_BYTES, int(assigned_bytes * FLOOR_SHARE))
    return min(assigned_bytes, -(-floor // PAGE) * PAGE)


def stepped(current: int, planned: int) -> int:
    """``planned``, at most STEP_BYTES away from ``current``."""
    return current + max(-STEP_BYTES, min(STEP_BYTES, planned - current))


def plan_targets(candidates: list[Candidate], reclaim_bytes: int) -> dict[str, int]:
    """Each VM's guest memory target (before the step) so that ``reclaim_bytes`` in total are
    taken from the VMs' full sizes, shared in proportion to their assigned memory, none below its
    floor; everything above the floors when the request is larger."""
    rooms = {
        c.instance_id: max(0, (c.assigned_bytes - protected_floor(c.assigned_bytes)) // PAGE)
        for c in candidates
    }
    weights = {c.instance_id: c.assigned_bytes for c in candidates}
    taken = dict.fromkeys(rooms, 0)  # pages
    remaining = min(max(0, reclaim_bytes) // PAGE, sum(rooms.values()))
    open_ = [vm for vm in rooms if rooms[vm] > 0]
    while remaining > 0 and open_:
        total_weight = sum(weights[vm] for vm in open_)
        given = 0
        for vm in open_:
            share = min(remaining * weights[vm] // total_weight, rooms[vm] - taken[vm])
            taken[vm] += share
            given += share
        remaining -= given
        open_ = [vm for vm in open_ if taken[vm] < rooms[vm]]
        if given == 0:  # fewer pages left than VMs to share them: the first VMs with room take them
            for vm in open_:
                extra = min(remaining, rooms[vm] - taken[vm])
                taken[vm] += extra
                remaining -= extra
            break
    return {c.instance_id: c.assigned_bytes - taken[c.instance_id] * PAGE for c in candidates}


def pressure_state(available_bytes: int, total_bytes: int) -> Literal["healthy", "pressure"]:
    return "pressure" if available_bytes < total_bytes * PRESSURE_AVAILABLE_SHARE else "healthy"
