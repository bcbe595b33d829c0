"""Snapshot schedules in the SDK's shapes (``SnapshotSchedule``, ``SnapshotScheduleRetention``,
the PUT's ``SetSnapshotScheduleRequest``), hypeman-behaviour §2.11.

A request is checked whole before anything is stored (400 naming the field). Durations keep the
Go syntax the client wrote (``"1h"``); the shortest interval is the server's to say (1m, or a
test build's lower minimum), so the scheduler checks that one.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypemand.instances.models import validate_name
from hypemand.policies.models import duration_seconds
from hypemand.tags import check_tags
from hypemand.units import parse_duration
from hypemand.wire import WireModel

NAME_PREFIX_MAX = 47  # 47 + "-" + a 15-character timestamp: a snapshot name's 63 at most
MAX_COUNT = 1_000_000


def go_duration(value: str, field: str) -> float:
    """``value`` in seconds if it is a positive Go duration; ValueError naming ``field``."""
    return duration_seconds(value, field)


class SnapshotScheduleRetention(WireModel):
    """Which of the schedule's own snapshots are deleted after each run: beyond the newest
    ``max_count`` (0: no count limit) and/or older than ``max_age``."""

    model_config = ConfigDict(extra="forbid")

    max_count: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    max_age: str | None = None

    @field_validator("max_age")
    @classmethod
    def _age_ok(cls, value: str | None) -> str | None:
        if value is not None:
            go_duration(value, "max_age")
        return value

    @model_validator(mode="after")
    def _one_given(self) -> SnapshotScheduleRetention:
        if self.max_count is None and self.max_age is None:
            raise ValueError("give max_count, max_age or both")
        return self

    @property
    def max_age_seconds(self) -> float | None:
        return parse_duration(self.max_age) if self.max_age is not None else None


class SetSnapshotScheduleRequest(BaseModel):
    """``PUT /instances/{id}/snapshot-schedule``: the whole schedule, replacing any other."""

    model_config = ConfigDict(extra="forbid")

    interval: str
    retention: SnapshotScheduleRetention
    name_prefix: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("interval")
    @classmethod
    def _interval_ok(cls, value: str) -> str:
        go_duration(value, "interval")
        return value

    @field_validator("name_prefix")
    @classmethod
    def _prefix_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > NAME_PREFIX_MAX:
            raise ValueError(f"at most {NAME_PREFIX_MAX} characters, got {len(value)}")
        return validate_name(value)

    @field_validator("metadata")
    @classmethod
    def _metadata_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_tags(value)


class SnapshotSchedule(WireModel):
    """A schedule as the API shows it and as ``snapshot-schedules/<instance id>.json`` keeps it."""

    NULLABLE = frozenset({"last_error", "last_run_at", "last_snapshot_id", "name_prefix"})

    instance_id: str
    interval: str
    name_prefix: str | None = None
    metadata: dict[str, str] | None = None
    retention: SnapshotScheduleRetention
    next_run_at: datetime
    last_run_at: datetime | None = None
    last_snapshot_id: str | None = None  # made by the last run that succeeded
    last_error: str | None = None  # of the last run; None once one succeeds
    created_at: datetime
    updated_at: datetime

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)
