"""The arithmetic of snapshot schedules, pure: when the next run is due, which scheduled
snapshots a retention deletes, what a scheduled snapshot is called."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta

DEFAULT_NAME_PREFIX = "scheduled"
NAME_TIME_FORMAT = "%Y%m%d-%H%M%S"  # 15 characters: prefix (<= 47) + "-" + this fits a name's 63


def first_run(now: datetime, interval: float) -> datetime:
    """A new schedule (or one whose interval changed) runs first one interval from now."""
    return now + timedelta(seconds=interval)


def next_after_run(planned: datetime, interval: float, finished: datetime) -> datetime:
    """When the run after one planned for ``planned`` (and ended at ``finished``) is due.

    On time, the cadence holds: ``planned + interval``. A run that ended an interval or more
    after it was due (the server was down, or the run was slow) is not followed by one run per
    slot it missed: the cadence starts again from its end."""
    step = timedelta(seconds=interval)
    following = planned + step
    return following if following > finished else finished + step


def next_on_update(current_next: datetime | None, current_interval: float | None, interval: float,
                   now: datetime) -> datetime:
    """A PUT that keeps the interval (changing only retention, metadata or prefix) keeps the next
    run; a new schedule or a new interval starts a new cadence."""
    if current_next is None or current_interval != interval:
        return first_run(now, interval)
    return current_next


def retention_victims(snapshots: Sequence[tuple[str, datetime]], max_count: int | None,
                      max_age: float | None, now: datetime) -> list[str]:
    """The ids among ``snapshots`` (id, created_at) that a retention deletes: all but the newest
    ``max_count`` (None or 0: no count limit), and any older than ``max_age`` seconds."""
    newest_first = sorted(snapshots, key=lambda item: (item[1], item[0]), reverse=True)
    doomed: list[str] = []
    for position, (snapshot_id, created_at) in enumerate(newest_first):
        too_many = bool(max_count) and position >= (max_count or 0)
        too_old = max_age is not None and now - created_at > timedelta(seconds=max_age)
        if too_many or too_old:
            doomed.append(snapshot_id)
    return doomed


def scheduled_name(prefix: str | None, at: datetime, taken: Collection[str] = ()) -> str:
    """``<prefix>-YYYYMMDD-HHMMSS`` in UTC (prefix default ``scheduled``). A name in ``taken``
    (the instance's snapshots' names: a run late into the second of the one before it, or a
    client's snapshot named so) moves on to the first free second after."""
    second = at.astimezone(UTC).replace(microsecond=0)
    while True:
        name = f"{prefix or DEFAULT_NAME_PREFIX}-{second.strftime(NAME_TIME_FORMAT)}"
        if name not in taken:
            return name
        second += timedelta(seconds=1)
