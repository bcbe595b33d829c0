"""What a run of probe outcomes means: the health rule, pure (no clock, no I/O).

:class:`HealthTracker` folds each probe's outcome into an ``InstanceHealthStatus`` the way the
reference describes (and Docker does):

* ``starting`` until ``success_threshold`` successes in a row, and for as long as the start
  period lasts: a failure inside the start period is recorded (``last_error``,
  ``last_failure_at``) but does not count towards ``failure_threshold``; the start period ends
  early at the first ``healthy``;
* ``healthy`` after ``success_threshold`` successes in a row, ``unhealthy`` after
  ``failure_threshold`` failures in a row (outside the start period); between the two the status
  stays what it was;
* ``unknown`` for a probe that cannot be made at all (an http check without a VM address): the
  counters stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from hypemand.policies.models import MAX_ERROR_CHARS, HealthCheck, HealthState, InstanceHealthStatus, seconds


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    error: str | None = None
    # The probe could not be made (no address to reach, no guest agent): neither a success nor a
    # failure of the program.
    unknown: bool = False


def truncated(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."


class HealthTracker:
    """The health of one VM's life (a new boot gets a new tracker)."""

    def __init__(self, check: HealthCheck, started_at: datetime) -> None:
        self.check = check
        self.start_period_ends = started_at + timedelta(seconds=seconds(check.start_period))
        self.status = InstanceHealthStatus(status="starting")
        self.became_healthy = False

    def in_start_period(self, now: datetime) -> bool:
        return not self.became_healthy and now < self.start_period_ends

    def observe(self, outcome: ProbeOutcome, now: datetime) -> InstanceHealthStatus:
        """Fold one outcome (probed at ``now``) in; returns the new status."""
        current = self.status
        if outcome.unknown:
            self.status = current.model_copy(update={
                "status": "unknown", "last_checked_at": now,
                "last_error": truncated(outcome.error or "the probe could not be made"),
            })
            return self.status
        if outcome.ok:
            successes = current.consecutive_successes + 1
            state: HealthState = current.status
            if successes >= self.check.success_threshold:
                state = "healthy"
                self.became_healthy = True
            elif state == "unknown":
                state = "starting"
            self.status = current.model_copy(update={
                "status": state, "consecutive_successes": successes, "consecutive_failures": 0,
                "last_checked_at": now, "last_success_at": now,
            })
            return self.status
        grace = self.in_start_period(now)
        failures = current.consecutive_failures if grace else current.consecutive_failures + 1
        state = current.status
        if state == "unknown":
            state = "starting"
        if not grace and failures >= self.check.failure_threshold:
            state = "unhealthy"
        self.status = current.model_copy(update={
            "status": state, "consecutive_failures": failures, "consecutive_successes": 0,
            "last_checked_at": now, "last_failure_at": now,
            "last_error": truncated(outcome.error or "probe failed"),
        })
        return self.status
