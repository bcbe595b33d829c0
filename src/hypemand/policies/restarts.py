"""The restart supervisor: brings a Stopped instance back through the normal start path when its
restart policy says so.

* ``always``: after any end of the VM the server did not ask for (the program exited, the VMM or
  the guest crashed); ``on_failure``: after a failed end (``InstanceEvent.failed``: a non-zero or
  unknown exit code, a signal, OOM, a crash). Both also when the health monitor finds the
  instance ``unhealthy``: it is stopped (``manual=False``), then started like any other restart,
  with ``last_reason = health_check_failed``.
* Each restart waits ``backoff``, doubled at each attempt in a row (at most five minutes, or
  ``backoff`` itself when longer); ``max_attempts`` (0: unlimited) attempts in a row, then
  ``blocked_reason = max_attempts_exceeded``; a VM that ran ``stable_after`` starts the count
  afresh. A manual stop blocks restarts until the next manual start (the manager writes both).
* Never a restore: an instance in Standby is left there.

**Crash-safe.** The plan is in the record before anything is done: ``next_attempt_at`` is
written before the wait (and, for an unhealthy VM, before the stop), and the attempt
(``attempts`` + 1, ``last_attempt_at``) before the start. A server killed meanwhile finds it at
its start: a pending attempt resumes its countdown; an attempt whose boot never launched
(``started_at`` older than ``last_attempt_at``) is made again without being counted twice; an
end the old server recorded but had no time to plan for is planned now. A boot that launched is
in the record (``started_at``), so an attempt is never made twice.

Every decision is re-checked under the instance's lock when it is carried out: a client's
start or stop meanwhile (the manager clears or blocks the status), a delete, another plan (a
different ``next_attempt_at``) make a waiting attempt stand down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

from hypemand.errors import DomainError, InvalidState, NotFound
from hypemand.instances import records
from hypemand.instances.events import EventKind, InstanceEvent
from hypemand.instances.live import LiveInstance, mutating
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import InstanceRecord, InstanceState, StartInstanceRequest
from hypemand.instances.records import utcnow
from hypemand.policies.clock import sleep_until
from hypemand.policies.health import HealthMonitor
from hypemand.policies.models import RestartPolicy, RestartStatus, seconds

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
STABLE_SWEEP_INTERVAL = 1.0


# ---- the rules (pure) ------------------------------------------------------------------------


def covers(policy: RestartPolicy | None, *, failed: bool) -> bool:
    """Whether an end of the VM the server did not ask for is restarted under ``policy``."""
    if policy is None:
        return False
    return policy.policy == "always" or (policy.policy == "on_failure" and failed)


def backoff_delay(policy: RestartPolicy, attempt: int) -> float:
    """Seconds to wait before attempt number ``attempt`` (1 for the first in a row)."""
    base = seconds(policy.backoff)
    return float(min(base * 2 ** max(0, attempt - 1), max(base, MAX_BACKOFF)))


def plan_restart(
    policy: RestartPolicy, status: RestartStatus | None, *, now: datetime, ran_for: float | None,
    reason: str | None = None,
) -> RestartStatus | None:
    """The status to write after an end ``policy`` covers: the next attempt scheduled, or the
    count exhausted (``max_attempts_exceeded``). None when restarts are blocked already.
    ``ran_for``: how long the VM ran (seconds; None: unknown), a stable run resets the count."""
    current = status or RestartStatus()
    if current.blocked_reason is not None:
        return None
    attempts = current.attempts
    if ran_for is not None and ran_for >= seconds(policy.stable_after):
        attempts = 0
    if policy.max_attempts and attempts >= policy.max_attempts:
        return current.model_copy(update={
            "attempts": attempts, "blocked_reason": "max_attempts_exceeded", "next_attempt_at": None})
    delay = backoff_delay(policy, attempts + 1)
    return current.model_copy(update={
        "attempts": attempts, "next_attempt_at": now + timedelta(seconds=delay), "last_reason": reason})


def attempt_made(status: RestartStatus, now: datetime) -> RestartStatus:
    return status.model_copy(update={
        "attempts": status.attempts + 1, "last_attempt_at": now, "next_attempt_at": None})


def ended_badly(record: InstanceRecord) -> bool:
    """A recorded end that counts as a failure: a crash, or no exit code 0."""
    return record.crash is not None or record.exit is None or record.exit.code != 0


def ran_for(record: InstanceRecord, until: datetime) -> float | None:
    if record.started_at is None:
        return None
    return max(0.0, (until - record.started_at).total_seconds())


def unplanned_end(record: InstanceRecord) -> bool:
    """At server start, for a Stopped instance without a pending attempt: its last end was one
    of the program's (an exit or a crash was recorded) after the last attempt, and the server
    that saw it was killed before planning (or never saw it)."""
    status = record.restart_status
    if record.exit is None and record.crash is None:
        return False
    if status is None or status.last_attempt_at is None:
        return True
    return record.stopped_at is not None and record.stopped_at > status.last_attempt_at


def attempt_interrupted(record: InstanceRecord) -> bool:
    """An attempt was recorded but its boot never launched (the server died in between)."""
    status = record.restart_status
    if status is None or status.last_attempt_at is None or status.next_attempt_at is not None:
        return False
    return record.started_at is None or record.started_at < status.last_attempt_at


# ---- the supervisor --------------------------------------------------------------------------


class RestartSupervisor:
    def __init__(self, instances: InstanceManager, health: HealthMonitor) -> None:
        self.instances = instances
        self._tasks: set[asyncio.Task[None]] = set()
        # Instances an event was handled for before start() (while the instances were taken
        # charge of): start() leaves them to that handling. None once started.
        self._seen: set[str] | None = set()
        self._sweeper: asyncio.Task[None] | None = None
        instances.events.subscribe(self._on_event)
        health.on_unhealthy(self._on_unhealthy)

    async def start(self) -> None:
        """After the instances were taken charge of: carry on with what the last server left."""
        seen, self._seen = self._seen or set(), None
        for live in self.instances.table:
            if live.id not in seen:
                self._spawn(self._recover(live), live)
        self._sweeper = asyncio.create_task(self._sweep_stable(), name="restart-stable")

    async def stop(self) -> None:
        tasks = list(self._tasks) + ([self._sweeper] if self._sweeper is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None], live: LiveInstance | str) -> None:
        instance_id = live if isinstance(live, str) else live.id
        if self._seen is not None:
            self._seen.add(instance_id)
        task = asyncio.create_task(self._guarded(work, instance_id), name=f"restart-{instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, None], instance_id: str) -> None:
        try:
            await work
        except NotFound:
            pass  # deleted meanwhile
        except DomainError as exc:
            log.warning("instance %s: restart policy: %s", instance_id, exc)
        except Exception:
            log.exception("instance %s: restart policy failed", instance_id)

    # ---- what starts a plan ---------------------------------------------------------------

    def _on_event(self, event: InstanceEvent) -> None:
        if event.kind is EventKind.EXITED:
            self._spawn(self._after_exit(event), event.instance_id)

    def _on_unhealthy(self, live: LiveInstance) -> None:
        self._spawn(self._after_unhealthy(live), live)

    async def _after_exit(self, event: InstanceEvent) -> None:
        live = self.instances.table.get(event.instance_id)
        if live is None:
            return
        async with mutating(live):
            record = live.record
            if not covers(record.restart_policy, failed=event.failed):
                return
            planned = await self._plan(live)
        if planned is not None and planned.next_attempt_at is not None:
            await self._restart_at(live, planned.next_attempt_at)

    async def _after_unhealthy(self, live: LiveInstance) -> None:
        """Stop, then start after the backoff; the plan is written before the stop."""
        async with mutating(live):
            policy = live.record.restart_policy
            if policy is None or policy.policy == "never" or live.health is None \
                    or live.health.status != "unhealthy":
                return
            state = (await self.instances.reader.state(live)).state
            if state is not InstanceState.RUNNING:
                return
            planned = await self._plan(live, reason="health_check_failed")
        if planned is None or planned.next_attempt_at is None:
            return
        with contextlib.suppress(InvalidState):  # it ended by itself meanwhile: the plan stands
            await self.instances.stop(live.id, manual=False)
        await self._restart_at(live, planned.next_attempt_at)

    async def _plan(self, live: LiveInstance, reason: str | None = None) -> RestartStatus | None:
        """Under the instance's lock: the next attempt (or the block) written to the record."""
        record = live.record
        assert record.restart_policy is not None
        now = utcnow()
        planned = plan_restart(record.restart_policy, record.restart_status, now=now,
                               ran_for=ran_for(record, record.stopped_at or now), reason=reason)
        if planned is None:
            return None
        await records.update(live, restart_status=planned)
        if planned.blocked_reason is not None:
            self.instances.oplog.write(live, f"restart policy: {planned.attempts} attempts made, no more "
                                             f"(max_attempts {record.restart_policy.max_attempts})")
        else:
            assert planned.next_attempt_at is not None
            why = " (health check failed)" if reason else ""
            self.instances.oplog.write(
                live, f"restart policy: attempt {planned.attempts + 1} at "
                      f"{planned.next_attempt_at.isoformat(timespec='milliseconds')}{why}")
        return planned

    # ---- carrying it out --------------------------------------------------------------------

    async def _restart_at(self, live: LiveInstance, due: datetime) -> None:
        await sleep_until(due)  # never before it: the plan in the record says when
        async with mutating(live):
            status = live.record.restart_status
            policy = live.record.restart_policy
            if policy is None or policy.policy == "never" or status is None \
                    or status.blocked_reason is not None or status.next_attempt_at != due:
                return  # a client (or a later plan) took over
            state = (await self.instances.reader.state(live)).state
            if state is not InstanceState.STOPPED:
                # Started by someone else, or in Standby (never restored here): nothing to do.
                await records.update(live, restart_status=status.model_copy(update={"next_attempt_at": None}))
                return
            await records.update(live, restart_status=attempt_made(status, utcnow()))
        await self._start(live)

    async def _start(self, live: LiveInstance) -> None:
        self.instances.oplog.write(live, "restart policy: starting")
        try:
            await self.instances.start(live.id, StartInstanceRequest(), manual=False)
        except InvalidState:
            return  # started (or deleted) by a client meanwhile
        except NotFound:
            return
        except DomainError as exc:
            # The attempt counts; the next one follows the backoff, as after a failed run.
            log.warning("instance %s (%s): restart failed: %s", live.name, live.id, exc)
            self.instances.oplog.write(live, f"restart policy: start failed: {exc}")
            async with mutating(live):
                if not covers(live.record.restart_policy, failed=True):
                    return
                planned = await self._plan(live)
            if planned is not None and planned.next_attempt_at is not None:
                await self._restart_at(live, planned.next_attempt_at)

    # ---- after a server restart -------------------------------------------------------------

    async def _recover(self, live: LiveInstance) -> None:
        record = live.record
        policy, status = record.restart_policy, record.restart_status
        if policy is None or policy.policy == "never" or (status is not None and status.blocked_reason):
            return
        state = (await self.instances.reader.state(live)).state
        if state is InstanceState.STOPPED:
            if status is not None and status.next_attempt_at is not None:
                log.info("instance %s (%s): restart pending at %s", live.name, live.id,
                         status.next_attempt_at)
                await self._restart_at(live, status.next_attempt_at)
            elif attempt_interrupted(record):
                log.info("instance %s (%s): a restart was interrupted: starting it", live.name, live.id)
                await self._start(live)
            elif unplanned_end(record) and covers(policy, failed=ended_badly(record)):
                async with mutating(live):
                    if live.record.restart_status != status:
                        return  # planned meanwhile
                    planned = await self._plan(live)
                if planned is not None and planned.next_attempt_at is not None:
                    await self._restart_at(live, planned.next_attempt_at)
        elif status is not None and status.next_attempt_at is not None and state is not InstanceState.STANDBY:
            # It runs: a health restart whose stop never happened (the monitor judges anew).
            async with mutating(live):
                current = live.record.restart_status
                if current is not None and current.next_attempt_at is not None:
                    await records.update(
                        live, restart_status=current.model_copy(update={"next_attempt_at": None}))

    # ---- stable runs ------------------------------------------------------------------------

    async def _sweep_stable(self) -> None:
        """A VM restarted by the policy that has run ``stable_after`` starts its count afresh."""
        while True:
            await asyncio.sleep(STABLE_SWEEP_INTERVAL)
            now = utcnow()
            for live in self.instances.table:
                if self._stable(live, now) and not live.lock.locked():
                    try:
                        async with mutating(live):
                            if self._stable(live, now):
                                status = live.record.restart_status
                                assert status is not None
                                await records.update(
                                    live, restart_status=status.model_copy(update={"attempts": 0}))
                                self.instances.oplog.write(live, "restart policy: stable, attempts reset")
                    except DomainError as exc:
                        log.warning("instance %s: restart count not reset: %s", live.id, exc)

    @staticmethod
    def _stable(live: LiveInstance, now: datetime) -> bool:
        record = live.record
        policy, status = record.restart_policy, record.restart_status
        if policy is None or status is None or status.attempts == 0 or status.blocked_reason is not None:
            return False
        if status.next_attempt_at is not None or record.started_at is None or not live.vmm_alive():
            return False
        if status.last_attempt_at is not None and record.started_at < status.last_attempt_at:
            return False
        ran = ran_for(record, now)
        return record.phase == "running" and ran is not None and ran >= seconds(policy.stable_after)
