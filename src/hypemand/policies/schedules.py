"""Snapshot schedules (hypeman-behaviour §2.11): a snapshot of an instance every ``interval``,
through the snapshot service like a client's own, and a retention that deletes only what the
schedule made.

One runner task per schedule sleeps until the schedule is due, takes the snapshot and applies
the retention, then records the run (``last_*``, ``next_run_at``) in the schedule's file. What
a run needs to know is in that file and in the snapshots' records, so a server that was down
runs an overdue schedule once at start (never once per slot it missed), and one killed in the
middle of a run finds, at start, the snapshot that run finished (or none: the snapshot service
removes a snapshot that was never finished).

A schedule whose instance was deleted stays, running only its retention, until the snapshots it
made are gone; then it removes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hypemand.errors import BadRequest, DomainError, InvalidState, NotFound
from hypemand.instances.events import EventKind, InstanceEvent
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import InstanceState
from hypemand.layout import DataLayout
from hypemand.policies import cadence
from hypemand.policies.models import MAX_ERROR_CHARS
from hypemand.policies.schedule_models import SetSnapshotScheduleRequest, SnapshotSchedule
from hypemand.policies.schedule_store import ScheduleStore
from hypemand.snapshots.models import CreateSnapshotRequest, SnapshotKind
from hypemand.snapshots.service import SnapshotService
from hypemand.units import parse_duration

log = logging.getLogger(__name__)

# A schedule whose instance is gone looks at least this often whether its snapshots are gone.
ORPHAN_RECHECK = 60.0
KIND_BY_STATE: dict[InstanceState, SnapshotKind] = {
    InstanceState.RUNNING: "Standby",
    InstanceState.STANDBY: "Standby",
    InstanceState.STOPPED: "Stopped",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def shown_seconds(seconds: float) -> str:
    """60.0 -> "1m", 1.5 -> "1.5s": a minimum in the Go syntax the client writes."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


@dataclass
class _Runner:
    schedule: SnapshotSchedule
    orphan: bool = False  # the instance was deleted
    deleted: bool = False  # the schedule was deleted: its run in flight records nothing
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    run: asyncio.Task[None] | None = None  # the run in flight (shielded from the task's cancel)


class SnapshotScheduler:
    def __init__(self, layout: DataLayout, instances: InstanceManager, snapshots: SnapshotService,
                 minimum_interval: float = 60.0) -> None:
        self.instances = instances
        self.snapshots = snapshots
        self.minimum_interval = minimum_interval
        self.store = ScheduleStore(layout)
        self._runners: dict[str, _Runner] = {}
        # Schedule files change one at a time: the API's set and delete, and runs' results.
        self._writing = asyncio.Lock()

    # ---- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """After the instances and the snapshots: both are known by then."""
        for schedule in await asyncio.to_thread(self.store.load_all):
            runner = _Runner(self._caught_up(schedule))
            runner.orphan = self.instances.table.get(schedule.instance_id) is None
            if runner.schedule is not schedule:
                await asyncio.to_thread(self.store.save, runner.schedule)
            self._launch(runner)
        self.instances.events.subscribe(self._on_event)

    def _caught_up(self, schedule: SnapshotSchedule) -> SnapshotSchedule:
        """The schedule with a run that the last server finished but had not recorded (it was
        killed in between) recorded now, as if it had ended when its snapshot was made."""
        made = self.snapshots.made_by_schedule(schedule.instance_id)
        newest = made[-1] if made else None
        if newest is None or newest.id == schedule.last_snapshot_id or (
                schedule.last_run_at is not None and newest.created_at <= schedule.last_run_at):
            return schedule
        log.info("snapshot schedule of %s: recording its run of %s that the last server did not record",
                 schedule.instance_id, newest.created_at.isoformat())
        return schedule.model_copy(update={
            "last_run_at": newest.created_at,
            "last_snapshot_id": newest.id,
            "last_error": None,
            "next_run_at": cadence.next_after_run(
                schedule.next_run_at, schedule.interval_seconds, newest.created_at),
        })

    async def stop(self) -> None:
        """Stop sleeping runners at once; a run in flight (a snapshot being taken) ends first."""
        runners = list(self._runners.values())
        for runner in runners:
            if runner.task is not None:
                runner.task.cancel()
        await asyncio.gather(*(r.task for r in runners if r.task is not None), return_exceptions=True)
        await asyncio.gather(*(r.run for r in runners if r.run is not None), return_exceptions=True)

    def _launch(self, runner: _Runner) -> None:
        self._runners[runner.schedule.instance_id] = runner
        runner.task = asyncio.create_task(
            self._loop(runner), name=f"snapshot-schedule-{runner.schedule.instance_id}")

    def _on_event(self, event: InstanceEvent) -> None:
        runner = self._runners.get(event.instance_id)
        if event.kind is EventKind.DELETED and runner is not None:
            runner.orphan = True
            runner.wake.set()

    # ---- the API ---------------------------------------------------------------------------------

    def get(self, ref: str) -> SnapshotSchedule:
        instance_id = self.instances.table.resolve(ref).id
        runner = self._runners.get(instance_id)
        if runner is None or runner.orphan:
            raise NotFound(f"instance {ref!r} has no snapshot schedule")
        return runner.schedule

    async def set(self, ref: str, request: SetSnapshotScheduleRequest) -> SnapshotSchedule:
        live = self.instances.table.resolve(ref)
        interval = request.interval
        seconds = parse_duration(interval)
        if seconds < self.minimum_interval:
            raise BadRequest(
                f"interval: must be at least {shown_seconds(self.minimum_interval)}, got {interval!r}",
                code="invalid_request",
            )
        async with self._writing:
            now = utcnow()
            runner = self._runners.get(live.id)
            current = runner.schedule if runner is not None else None
            schedule = SnapshotSchedule(
                instance_id=live.id,
                interval=interval,
                name_prefix=request.name_prefix,
                metadata=request.metadata,
                retention=request.retention,
                next_run_at=cadence.next_on_update(
                    current.next_run_at if current else None,
                    current.interval_seconds if current else None,
                    seconds,
                    now,
                ),
                last_run_at=current.last_run_at if current else None,
                last_snapshot_id=current.last_snapshot_id if current else None,
                last_error=current.last_error if current else None,
                created_at=current.created_at if current else now,
                updated_at=now,
            )
            await asyncio.to_thread(self.store.save, schedule)  # stored, then in effect
            if runner is None:
                self._launch(_Runner(schedule))
            else:
                runner.schedule = schedule
                runner.wake.set()
        return schedule

    async def delete(self, ref: str) -> None:
        """The schedule is gone when this returns: a run in flight ends first (its snapshot and
        retention land, its record does not), and nothing else runs."""
        instance_id = self.instances.table.resolve(ref).id
        async with self._writing:
            runner = self._runners.get(instance_id)
            if runner is None or runner.orphan:
                raise NotFound(f"instance {ref!r} has no snapshot schedule")
            await asyncio.to_thread(self.store.remove, instance_id)
            del self._runners[instance_id]
            runner.deleted = True
        await self._end(runner)

    async def _end(self, runner: _Runner) -> None:
        if runner.task is not None:
            runner.task.cancel()
            await asyncio.gather(runner.task, return_exceptions=True)
        if runner.run is not None:
            await asyncio.gather(runner.run, return_exceptions=True)

    # ---- runs -----------------------------------------------------------------------------------

    async def _loop(self, runner: _Runner) -> None:
        while True:
            runner.wake.clear()
            gone = runner.orphan and not self.snapshots.made_by_schedule(runner.schedule.instance_id)
            if gone and await self._retire(runner):
                return
            wait = (runner.schedule.next_run_at - utcnow()).total_seconds()
            if runner.orphan:
                wait = min(wait, ORPHAN_RECHECK)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runner.wake.wait(), wait)
                if (runner.schedule.next_run_at - utcnow()).total_seconds() > 0:
                    continue  # woken by a change, or an orphan's recheck
            # Shielded: stopping the server or deleting the schedule waits for the run to end
            # instead of cancelling a snapshot half-way.
            runner.run = asyncio.create_task(self._run(runner))
            await asyncio.shield(runner.run)

    async def _run(self, runner: _Runner) -> None:
        planned = runner.schedule.next_run_at
        started = utcnow()
        instance_id = runner.schedule.instance_id
        snapshot_id: str | None = None
        error: str | None = None
        try:
            if not runner.orphan:  # an orphan's runs are its retention only
                snapshot_id = await self._snapshot(runner.schedule, started)
        except NotFound:
            runner.orphan = True  # deleted under the run; the retention still applies
        except DomainError as exc:
            error = str(exc)
            log.info("snapshot schedule of %s: run failed: %s", instance_id, error)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("snapshot schedule of %s: run failed: %s", instance_id, error)
        except Exception as exc:  # a bug: said loudly, and the schedule goes on
            error = f"{type(exc).__name__}: {exc}"
            log.exception("snapshot schedule of %s: run failed", instance_id)
        await self._apply_retention(runner.schedule)
        await self._record(runner, planned, started, snapshot_id, error)

    async def _snapshot(self, schedule: SnapshotSchedule, at: datetime) -> str:
        """Take the run's snapshot, its kind from the instance's state now."""
        instance = await self.instances.get(schedule.instance_id)
        kind = KIND_BY_STATE.get(instance.state)
        if kind is None:
            raise InvalidState(
                f"invalid state transition: no scheduled snapshot of instance {instance.name} "
                f"in state {instance.state.value} (it needs Running, Standby or Stopped)")
        taken = {s.name for s in self.snapshots.list(source_instance_id=schedule.instance_id) if s.name}
        request = CreateSnapshotRequest(
            kind=kind, name=cadence.scheduled_name(schedule.name_prefix, at, taken), tags=schedule.metadata)
        # Compression (a Standby snapshot's) follows the instance's snapshot policy, as for a
        # client's snapshot that names none.
        snapshot = await self.snapshots.create(
            schedule.instance_id, request, scheduled_by=schedule.instance_id)
        log.info("snapshot schedule of %s: took %s snapshot %s", schedule.instance_id, kind, snapshot.id)
        return snapshot.id

    async def _apply_retention(self, schedule: SnapshotSchedule) -> None:
        made = self.snapshots.made_by_schedule(schedule.instance_id)
        doomed = cadence.retention_victims(
            [(s.id, s.created_at) for s in made],
            schedule.retention.max_count,
            schedule.retention.max_age_seconds,
            utcnow(),
        )
        for snapshot_id in doomed:
            try:
                await self.snapshots.delete(snapshot_id)
            except NotFound:
                continue  # a client deleted it meanwhile
            except (DomainError, OSError) as exc:
                log.warning("snapshot schedule of %s: retention could not delete %s: %s",
                            schedule.instance_id, snapshot_id, exc)
                continue
            log.info("snapshot schedule of %s: retention deleted snapshot %s",
                     schedule.instance_id, snapshot_id)

    async def _record(self, runner: _Runner, planned: datetime, started: datetime,
                      snapshot_id: str | None, error: str | None) -> None:
        async with self._writing:
            if runner.deleted:
                return
            current = runner.schedule  # a PUT may have replaced it during the run
            if current.next_run_at != planned:
                upcoming = current.next_run_at  # the PUT started a new cadence: keep it
            else:
                upcoming = cadence.next_after_run(planned, current.interval_seconds, utcnow())
            if runner.orphan and error is None:
                left = len(self.snapshots.made_by_schedule(current.instance_id))
                error = (f"instance {current.instance_id} was deleted: the schedule stays, running only "
                         f"its retention, until its {left} scheduled snapshot(s) are gone")
            runner.schedule = current.model_copy(update={
                "last_run_at": started,
                "last_snapshot_id": snapshot_id or current.last_snapshot_id,
                "last_error": error[:MAX_ERROR_CHARS] if error else None,
                "next_run_at": upcoming,
            })
            try:
                await asyncio.to_thread(self.store.save, runner.schedule)
            except (DomainError, OSError) as exc:
                # Kept in memory: the next run is still due when planned; the file catches up
                # at the next write (a server started meanwhile runs the schedule once more).
                log.warning("snapshot schedule of %s: could not record its run: %s", current.instance_id, exc)

    async def _retire(self, runner: _Runner) -> bool:
        """The instance is gone and so are the snapshots its schedule made: the schedule too.
        False if its file could not be removed (tried again at the next recheck)."""
        instance_id = runner.schedule.instance_id
        async with self._writing:
            if runner.deleted:
                return True
            try:
                await asyncio.to_thread(self.store.remove, instance_id)
            except OSError as exc:
                log.warning("snapshot schedule of deleted instance %s: could not remove it: %s",
                            instance_id, exc)
                return False
            self._runners.pop(instance_id, None)
            runner.deleted = True
        log.info("snapshot schedule of deleted instance %s removed: its snapshots are gone", instance_id)
        return True

