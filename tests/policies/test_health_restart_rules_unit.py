"""The pure rules of the health monitor (thresholds, start period) and of the restart
supervisor (which ends it covers, backoff, attempt limits, stable runs, recovery at start)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypemand.instances.models import GuestExitInfo, InstanceRecord
from hypemand.policies.health_state import HealthTracker, ProbeOutcome
from hypemand.policies.models import MAX_ERROR_CHARS, HealthCheck, RestartPolicy, RestartStatus
from hypemand.policies.restarts import (
    attempt_interrupted,
    attempt_made,
    backoff_delay,
    covers,
    ended_badly,
    plan_restart,
    unplanned_end,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OK = ProbeOutcome(True)
FAIL = ProbeOutcome(False, "connection refused")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def check(**fields: object) -> HealthCheck:
    return HealthCheck.model_validate({"type": "tcp", "tcp": {"port": 80}, **fields})


def test_success_threshold_makes_healthy_and_failure_threshold_unhealthy() -> None:
    tracker = HealthTracker(check(start_period="0s", success_threshold=2, failure_threshold=3), T0)
    assert tracker.observe(OK, at(1)).status == "starting"
    healthy = tracker.observe(OK, at(2))
    assert (healthy.status, healthy.consecutive_successes, healthy.last_success_at) == ("healthy", 2, at(2))
    assert tracker.observe(FAIL, at(3)).status == "healthy"
    assert tracker.observe(FAIL, at(4)).status == "healthy"
    sick = tracker.observe(FAIL, at(5))
    assert (sick.status, sick.consecutive_failures, sick.consecutive_successes) == ("unhealthy", 3, 0)
    assert (sick.last_error, sick.last_failure_at, sick.last_checked_at) == (FAIL.error, at(5), at(5))
    assert tracker.observe(OK, at(6)).status == "unhealthy"  # two successes needed
    assert tracker.observe(OK, at(7)).status == "healthy"


def test_failures_inside_the_start_period_do_not_count() -> None:
    tracker = HealthTracker(check(start_period="10s", failure_threshold=1), T0)
    inside = tracker.observe(FAIL, at(5))
    assert (inside.status, inside.consecutive_failures, inside.last_error) == ("starting", 0, FAIL.error)
    assert tracker.observe(FAIL, at(11)).status == "unhealthy"


def test_the_start_period_ends_at_the_first_healthy() -> None:
    tracker = HealthTracker(check(start_period="1m", failure_threshold=1), T0)
    assert tracker.observe(OK, at(1)).status == "healthy"
    assert tracker.observe(FAIL, at(2)).status == "unhealthy"


def test_a_probe_that_cannot_be_made_is_unknown_and_leaves_the_counters() -> None:
    tracker = HealthTracker(check(start_period="0s"), T0)
    tracker.observe(OK, at(1))
    unknown = tracker.observe(ProbeOutcome(False, "no address", unknown=True), at(2))
    assert (unknown.status, unknown.consecutive_successes, unknown.last_error) == ("unknown", 1, "no address")
    assert tracker.observe(OK, at(3)).status == "healthy"


def test_last_error_is_truncated() -> None:
    tracker = HealthTracker(check(start_period="0s"), T0)
    error = tracker.observe(ProbeOutcome(False, "x" * 5000), at(1)).last_error
    assert error is not None and len(error) == MAX_ERROR_CHARS and error.endswith("...")


def policy(**fields: object) -> RestartPolicy:
    return RestartPolicy.model_validate(fields)


def test_which_ends_each_policy_restarts() -> None:
    assert not covers(None, failed=True)
    assert not covers(policy(policy="never"), failed=True)
    assert covers(policy(policy="always"), failed=False)
    assert covers(policy(policy="on_failure"), failed=True)
    assert not covers(policy(policy="on_failure"), failed=False)


def test_backoff_doubles_up_to_five_minutes_or_the_backoff_itself() -> None:
    five = policy(backoff="5s")
    assert [backoff_delay(five, n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert backoff_delay(five, 30) == 300.0
    assert backoff_delay(policy(backoff="10m"), 3) == 600.0
    assert backoff_delay(policy(backoff="0s"), 4) == 0.0


def test_plan_schedules_then_blocks_after_max_attempts() -> None:
    rule = policy(policy="on_failure", backoff="2s", max_attempts=2)
    first = plan_restart(rule, None, now=T0, ran_for=1.0)
    assert first is not None and (first.attempts, first.next_attempt_at) == (0, at(2))
    second = plan_restart(rule, attempt_made(first, at(2)), now=at(3), ran_for=1.0)
    assert second is not None and (second.attempts, second.next_attempt_at) == (1, at(7))
    third = plan_restart(rule, attempt_made(second, at(7)), now=at(8), ran_for=1.0)
    assert third is not None and third.blocked_reason == "max_attempts_exceeded"
    assert (third.attempts, third.next_attempt_at, third.last_attempt_at) == (2, None, at(7))
    assert plan_restart(rule, third, now=at(9), ran_for=1.0) is None


def test_a_stable_run_starts_the_count_afresh_and_manual_stop_blocks() -> None:
    rule = policy(policy="always", backoff="1s", max_attempts=1, stable_after="1m")
    used = RestartStatus(attempts=1, last_attempt_at=T0)
    assert plan_restart(rule, used, now=at(30), ran_for=29.0).blocked_reason == "max_attempts_exceeded"  # type: ignore[union-attr]
    fresh = plan_restart(rule, used, now=at(90), ran_for=61.0)
    assert fresh is not None and fresh.attempts == 0 and fresh.next_attempt_at == at(91)
    assert plan_restart(rule, RestartStatus(blocked_reason="manual_stop"), now=T0, ran_for=None) is None
    health = plan_restart(rule, None, now=T0, ran_for=None, reason="health_check_failed")
    assert health is not None and health.last_reason == "health_check_failed"


def record(**fields: object) -> InstanceRecord:
    base: dict[str, object] = {
        "id": "i", "name": "n", "image": "img", "image_digest": "sha256:0", "platform": "linux/amd64",
        "board": "qemu", "vcpus": 1, "memory_bytes": 1, "overlay_bytes": 1, "mac": "52:54:00:00:00:01",
        "created_at": T0, "phase_since": T0, "restart_policy": {"policy": "on_failure"},
    }
    return InstanceRecord.model_validate({**base, **fields})


def test_what_a_server_start_finds() -> None:
    exited = {"exit": GuestExitInfo(code=1, message="x"), "started_at": at(1), "stopped_at": at(2)}
    assert unplanned_end(record(**exited)) and ended_badly(record(**exited))
    assert not ended_badly(record(exit=GuestExitInfo(code=0, message="")))
    assert ended_badly(record(crash="killed"))
    assert not unplanned_end(record(started_at=at(1), stopped_at=at(2)))  # nothing recorded: a fork, a stop
    seen = RestartStatus(attempts=1, last_attempt_at=at(3))
    assert not unplanned_end(record(**exited, restart_status=seen))
    assert unplanned_end(record(**{**exited, "stopped_at": at(4)}, restart_status=seen))
    # the attempt was written, its boot never launched: made again, not counted twice
    assert attempt_interrupted(record(**exited, restart_status=seen))
    assert not attempt_interrupted(record(**{**exited, "started_at": at(3.5)}, restart_status=seen))
    assert not attempt_interrupted(record(**exited, restart_status=seen.model_copy(
        update={"next_attempt_at": at(9)})))
