"""Snapshot schedules, the pure parts: when runs are due, what a retention deletes, what a
scheduled snapshot is called, which requests are refused (and that the server's minimum is the
reference's 1m unless a test sets its own)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hypemand.config import Settings
from hypemand.policies import cadence
from hypemand.policies.schedule_models import (
    SetSnapshotScheduleRequest,
    SnapshotSchedule,
    SnapshotScheduleRetention,
)
from hypemand.policies.schedules import shown_seconds

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
MINUTE = 60.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---- when the next run is due ----------------------------------------------------------------


def test_a_new_schedule_runs_one_interval_from_now() -> None:
    assert cadence.first_run(T0, 3600) == at(3600)


def test_an_on_time_run_keeps_the_cadence_even_when_it_ends_late_within_the_interval() -> None:
    assert cadence.next_after_run(at(0), MINUTE, finished=at(0.5)) == at(60)
    assert cadence.next_after_run(at(0), MINUTE, finished=at(59.9)) == at(60)


def test_runs_missed_while_the_server_was_down_run_once_then_the_cadence_starts_from_that_run() -> None:
    # Due at 0, the server came back at 10 intervals and 5 s: one run, the next an interval on.
    finished = at(10 * MINUTE + 5)
    upcoming = cadence.next_after_run(at(0), MINUTE, finished=finished)
    assert upcoming == finished + timedelta(minutes=1)
    # Exactly an interval late: still no second run straight after.
    assert cadence.next_after_run(at(0), MINUTE, finished=at(60)) == at(120)


def test_an_update_keeps_the_next_run_unless_the_interval_changes() -> None:
    planned = at(1800)
    assert cadence.next_on_update(planned, 3600, 3600, now=at(100)) == planned
    assert cadence.next_on_update(planned, 3600, 600, now=at(100)) == at(700)
    assert cadence.next_on_update(None, None, 600, now=at(100)) == at(700)


# ---- retention ---------------------------------------------------------------------------------


def made(*ages_in_minutes: float) -> list[tuple[str, datetime]]:
    """Snapshots named by their age, made that many minutes before ``at(3600)``."""
    return [(f"age{age:g}", at(3600 - age * 60)) for age in ages_in_minutes]


def test_max_count_keeps_the_newest() -> None:
    snapshots = made(1, 5, 3, 2, 4)
    assert sorted(cadence.retention_victims(snapshots, 2, None, at(3600))) == ["age3", "age4", "age5"]
    assert cadence.retention_victims(snapshots, 5, None, at(3600)) == []
    assert cadence.retention_victims(snapshots, 9, None, at(3600)) == []


def test_max_count_zero_deletes_nothing_by_count() -> None:
    assert cadence.retention_victims(made(1, 2, 3), 0, None, at(3600)) == []
    assert cadence.retention_victims(made(1, 2, 3), None, None, at(3600)) == []


def test_max_age_deletes_the_older_ones_and_both_rules_add_up() -> None:
    snapshots = made(1, 10, 20, 30)
    assert sorted(cadence.retention_victims(snapshots, None, 15 * MINUTE, at(3600))) == ["age20", "age30"]
    assert sorted(cadence.retention_victims(snapshots, 3, 25 * MINUTE, at(3600))) == ["age30"]
    assert sorted(cadence.retention_victims(snapshots, 1, 25 * MINUTE, at(3600))) == [
        "age10", "age20", "age30"]


def test_snapshots_made_in_the_same_instant_are_ordered_by_id() -> None:
    same = [("b", T0), ("a", T0), ("c", T0)]
    assert cadence.retention_victims(same, 2, None, T0) == ["a"]


# ---- names -------------------------------------------------------------------------------------


def test_scheduled_names_use_the_prefix_and_fit_the_name_rule() -> None:
    assert cadence.scheduled_name("nightly", T0) == "nightly-20261207-120000"
    assert cadence.scheduled_name(None, T0) == "scheduled-20261207-120000"
    longest = cadence.scheduled_name("p" * 47, T0)
    SetSnapshotScheduleRequest.model_validate(request(name_prefix="p" * 47))
    assert len(longest) == 63
    # A second already taken (a run late into its predecessor's second): the next free one.
    taken = {"x-20261207-120000", "x-20261207-120001"}
    assert cadence.scheduled_name("x", T0 + timedelta(milliseconds=700), taken) == "x-20261207-120002"
    # Named in UTC whatever the clock's zone.
    other_zone = T0.astimezone(timezone(timedelta(hours=5)))
    assert cadence.scheduled_name("x", other_zone) == "x-20261207-120000"


# ---- requests ----------------------------------------------------------------------------------


def request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"interval": "1h", "retention": {"max_count": 3}}
    body.update(changes)
    return body


def refused(body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        SetSnapshotScheduleRequest.model_validate(body)
    return str(caught.value)


def test_valid_requests() -> None:
    parsed = SetSnapshotScheduleRequest.model_validate(request(
        retention={"max_count": 0, "max_age": "168h"}, name_prefix="db-nightly",
        metadata={"team": "data"}))
    assert parsed.retention.max_age_seconds == 168 * 3600
    assert parsed.retention.max_count == 0
    SetSnapshotScheduleRequest.model_validate(request(retention={"max_age": "30m"}, name_prefix=None))


@pytest.mark.parametrize(("body", "field"), [
    (request(interval="soon"), "interval"),
    (request(interval="0s"), "interval"),
    (request(interval="-1m"), "interval"),
    (request(interval="3000000h"), "interval"),
    ({"interval": "1h"}, "retention"),
    (request(retention={}), "retention"),
    (request(retention={"max_count": -1}), "max_count"),
    (request(retention={"max_age": "a week"}), "max_age"),
    (request(retention={"max_age": "0s"}), "max_age"),
    (request(retention={"max_count": 1, "keep": 2}), "keep"),
    (request(name_prefix="Nightly"), "name_prefix"),
    (request(name_prefix="p" * 48), "name_prefix"),
    (request(name_prefix="ends-"), "name_prefix"),
    (request(metadata={"bad key!": "v"}), "metadata"),
    (request(metadata={f"k{i}": "v" for i in range(51)}), "metadata"),
    (request(cron="* * * * *"), "cron"),
])
def test_bad_requests_name_the_field(body: dict[str, Any], field: str) -> None:
    assert field in refused(body)


def test_the_wire_shape_leaves_out_what_is_unset_and_sends_null_only_where_the_sdk_allows() -> None:
    schedule = SnapshotSchedule(
        instance_id="i", interval="1h", retention=SnapshotScheduleRetention(max_count=2),
        next_run_at=T0, created_at=T0, updated_at=T0)
    wire = schedule.model_dump(mode="json")
    assert wire["retention"] == {"max_count": 2}
    assert "metadata" not in wire
    assert wire["last_error"] is None and wire["last_snapshot_id"] is None and wire["name_prefix"] is None


# ---- the server's minimum ----------------------------------------------------------------------


def test_the_minimum_interval_is_one_minute_unless_a_test_lowers_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYPEMAND_TEST_SCHEDULE_MIN_INTERVAL", raising=False)
    assert Settings.load(tmp_path).schedule_min_interval == 60.0
    monkeypatch.setenv("HYPEMAND_TEST_SCHEDULE_MIN_INTERVAL", "1500ms")
    assert Settings.load(tmp_path).schedule_min_interval == 1.5
    assert shown_seconds(60.0) == "1m" and shown_seconds(1.5) == "1.5s"
