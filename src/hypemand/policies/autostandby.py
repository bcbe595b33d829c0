"""Auto-standby: an instance with an enabled ``auto_standby`` policy goes to Standby once it has
had no inbound TCP connection for its ``idle_timeout`` (reference §3.11).

Every second (:data:`POLL_INTERVAL`) the controller reads, from the VM network's connection
tracking, the TCP flows each eligible instance answers (:class:`~hypemand.network.conntrack.FlowReader`,
filtered by the kernel, in a thread of its own) and feeds its
:class:`~hypemand.policies.activity.IdleCountdown`. A countdown that ends asks
``InstanceManager.standby(..., manual=False)`` in a task of its own, at most ``max_concurrent`` at
once; the others queue. The standby's ``precheck`` reads the table again with the VM paused and
saved, just before the standby is committed, and gives it up (the VM runs on) when a connection
appeared or a hold came meanwhile. A hold or new activity cancels a queued attempt.

The countdown's timestamps are kept in the instance's record (``auto_standby_memory``), written
when the countdown starts or stops (not on every read), so a restarted server resumes it; a
restore or a start begins a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import IPv4Address
from typing import Literal

from hypemand.errors import Conflict, DomainError, InvalidState, NotFound
from hypemand.instances import records
from hypemand.instances.events import EventKind, InstanceEvent
from hypemand.instances.live import LiveInstance
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import InstanceState, StandbyInstanceRequest
from hypemand.instances.records import utcnow
from hypemand.network.conntrack import FlowReader, TcpFlow
from hypemand.policies.activity import IdleCountdown, InboundFilter
from hypemand.policies.models import (
    AutoStandbyMemory,
    AutoStandbyPolicy,
    AutoStandbyReason,
    AutoStandbyStatus,
    seconds,
)
from hypemand.units import format_duration

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
# The longest an instance's flows go unread: within it no activity is missed (a finished flow
# stays in the table: TIME_WAIT two minutes, CLOSE ten seconds), only seen a little late. An
# instance is read every tenth of its idle timeout, between POLL_INTERVAL and this.
MAX_READ_INTERVAL = 5.0
DEFAULT_MAX_CONCURRENT = 16
TRACKING_MODE = "conntrack_poll_v4_tcp"
STOP_GRACE = 30.0  # how long the server's stop waits for standbys already being committed


class StandbyCancelled(Conflict):
    """The last check before the commit found a connection, a hold, or no way to look."""

    code = "auto_standby_cancelled"


@dataclass
class Tracked:
    """What the controller holds for one instance between reads."""

    countdown: IdleCountdown
    attempt: asyncio.Task[None] | None = None
    phase: Literal["queued", "standby"] | None = None
    cancelled: bool = False  # a hold or activity came while the attempt was under way
    committing: bool = False  # the precheck passed: the standby can no longer be given up
    next_read: datetime | None = None  # its flows are read again from then on

    @property
    def requested(self) -> bool:
        return self.attempt is not None and not self.cancelled


def _timeout(policy: AutoStandbyPolicy) -> timedelta:
    assert policy.idle_timeout is not None  # an enabled policy has one (models.py)
    return timedelta(seconds=seconds(policy.idle_timeout))


def _address(live: LiveInstance) -> IPv4Address:
    assert live.record.ip is not None  # eligible instances have one
    return IPv4Address(live.record.ip)


def _enabled(live: LiveInstance) -> AutoStandbyPolicy | None:
    policy = live.record.auto_standby
    return policy if policy is not None and policy.enabled and not live.deleted else None


class AutoStandbyController:
    def __init__(
        self,
        manager: InstanceManager,
        flows: FlowReader | None,
        *,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        poll_interval: float = POLL_INTERVAL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """``flows``: the VM network's connection tracking; None when VMs have no address of
        their own (user-mode networking): every instance is then ``missing_ip``."""
        self.manager = manager
        self.flows = flows
        self.poll_interval = poll_interval
        self.clock = clock
        self.supported = sys.platform.startswith("linux")
        self.observer_error: str | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tracked: dict[str, Tracked] = {}
        self._fresh: set[str] = set()  # started or restored: the countdown begins anew
        self._loop: asyncio.Task[None] | None = None

    # ---- running --------------------------------------------------------------------------------

    def start(self) -> None:
        self.manager.events.subscribe(self._on_event)
        if self.supported:
            self._loop = asyncio.create_task(self._run(), name="auto-standby")

    async def close(self) -> None:
        """Stop observing. Queued attempts are dropped; one being committed is let finish."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        attempts = [t.attempt for t in self._tracked.values() if t.attempt is not None]
        for tracked in self._tracked.values():
            if tracked.attempt is not None and not tracked.committing:
                tracked.attempt.cancel()
        if attempts:
            await asyncio.wait(attempts, timeout=STOP_GRACE)
        if self.flows is not None:
            self.flows.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.tick()
            except Exception:  # one bad read must not end auto-standby for every instance
                log.exception("auto-standby: a pass over the instances failed")
            # A pass that takes long (a huge table, many VMs) is run less often, so that reading
            # never takes more than a fifth of the server's time. Nothing is missed meanwhile:
            # a finished flow stays in the table (TIME_WAIT two minutes, CLOSE ten seconds).
            spent = loop.time() - started
            await asyncio.sleep(max(self.poll_interval - spent, 4 * spent))

    async def tick(self) -> None:
        """One pass: which instances may go to standby, one read of their inbound flows, their
        countdowns (the loop runs it every ``poll_interval``)."""
        watched = [live for live in self.manager.table if _enabled(live) is not None]
        for gone in set(self._tracked) - {live.id for live in watched}:
            self._forget(gone)
        counted: list[LiveInstance] = []
        now = self.clock()
        for live in watched:
            reason = await self._ineligible(live)
            if reason is not None:
                await self._not_counting(live)
            elif self._read_due(live, now):
                counted.append(live)
        if not counted or self.flows is None:
            return  # nothing to count: the table is not read at all
        try:
            flows = await self.flows.inbound_tcp_flows({_address(live) for live in counted})
        except Exception as exc:
            if self.observer_error is None:
                log.warning("auto-standby: cannot read connection tracking: %s", exc)
            self.observer_error = f"{type(exc).__name__}: {exc}"
            return
        if self.observer_error is not None:
            log.info("auto-standby: connection tracking readable again")
            self.observer_error = None
        for live in counted:
            await self._count(live, flows.get(_address(live), []))

    def _read_due(self, live: LiveInstance, now: datetime) -> bool:
        tracked = self._tracked.get(live.id)
        return tracked is None or tracked.next_read is None or tracked.next_read <= now

    def _read_interval(self, policy: AutoStandbyPolicy) -> timedelta:
        tenth = _timeout(policy).total_seconds() / 10
        return timedelta(seconds=min(MAX_READ_INTERVAL, max(self.poll_interval, tenth)))

    async def _not_counting(self, live: LiveInstance) -> None:
        """An instance that cannot go to standby now: no countdown (a start or a restore begins
        a fresh one), unless its own standby is under way (its VM paused)."""
        tracked = self._tracked.get(live.id)
        if tracked is not None and tracked.attempt is not None:
            return
        self._forget(live.id)
        memory = live.record.auto_standby_memory
        if memory is not None and memory.idle_since is not None:
            await self._remember(live, memory.model_copy(update={"idle_since": None}))

    async def _count(self, live: LiveInstance, flows: list[TcpFlow]) -> None:
        policy = _enabled(live)
        if policy is None or live.record.ip is None:
            return
        tracked = self._tracked.get(live.id)
        if tracked is None:
            tracked = self._tracked[live.id] = Tracked(self._countdown_of(live))
        if tracked.committing:
            return
        now = self.clock()
        tracked.next_read = now + self._read_interval(policy)
        countdown = tracked.countdown
        if countdown.observe(InboundFilter.of(live.record.ip, policy).inbound(flows), now):
            await self._remember(live, countdown.memory())
        if countdown.due(_timeout(policy), now):
            if tracked.attempt is None:
                self._request(live, tracked)
        elif tracked.attempt is not None:
            self._cancel(tracked)

    def _countdown_of(self, live: LiveInstance) -> IdleCountdown:
        """The record's countdown (a restarted server resumes it), or a fresh one after a start
        or a restore (keeping a hold that has not ended)."""
        memory = live.record.auto_standby_memory
        if live.id in self._fresh:
            self._fresh.discard(live.id)
            return IdleCountdown(hold_until=memory.hold_until if memory is not None else None)
        return IdleCountdown.resumed(memory)

    async def _ineligible(self, live: LiveInstance, *, saving: bool = False) -> AutoStandbyReason | None:
        """Why the instance cannot go to standby by itself now (None: it can). ``saving``: its
        standby is being committed, so it is paused and still counts as running until saved."""
        state = (await self.manager.reader.state(live)).state
        if state is not InstanceState.RUNNING and not (saving and state is InstanceState.PAUSED):
            return "instance_not_running"
        if not live.record.network_enabled:
            return "network_disabled"
        if self.flows is None or live.record.ip is None:
            return "missing_ip"  # QEMU's user-mode NIC: no address of its own to count flows to
        return None

    async def _remember(self, live: LiveInstance, memory: AutoStandbyMemory) -> None:
        try:
            await records.update(live, auto_standby_memory=memory)
        except DomainError as exc:  # a full disk: the countdown goes on in memory
            log.warning("auto-standby: instance %s: cannot record its idle countdown: %s", live.id, exc)

    def _forget(self, instance_id: str) -> None:
        tracked = self._tracked.pop(instance_id, None)
        if tracked is not None and tracked.attempt is not None:
            self._cancel(tracked)

    # ---- standby attempts --------------------------------------------------------------------

    def _request(self, live: LiveInstance, tracked: Tracked) -> None:
        tracked.phase, tracked.cancelled = "queued", False
        tracked.attempt = asyncio.create_task(self._attempt(live, tracked), name=f"auto-standby-{live.id}")

    def _cancel(self, tracked: Tracked) -> None:
        """Give up an attempt: a queued one at once, one under way at its precheck."""
        if tracked.attempt is None or tracked.committing:
            return
        tracked.cancelled = True
        if tracked.phase == "queued":
            tracked.attempt.cancel()

    async def _attempt(self, live: LiveInstance, tracked: Tracked) -> None:
        try:
            async with self._slots:
                if tracked.cancelled:
                    return
                tracked.phase = "standby"
                countdown = tracked.countdown
                log.info("auto-standby: instance %s (%s) idle since %s: putting it in standby",
                         live.name, live.id, countdown.idle_since)
                await self.manager.standby(
                    live.id, StandbyInstanceRequest(), manual=False,
                    precheck=lambda: self._precheck(live, tracked),
                )
                log.info("auto-standby: instance %s (%s) is in standby", live.name, live.id)
        except asyncio.CancelledError:
            if tracked.phase != "queued":
                raise
        except StandbyCancelled as exc:
            log.info("auto-standby: instance %s (%s) stays running: %s", live.name, live.id, exc)
            await self._remember(live, tracked.countdown.memory())
        except (NotFound, InvalidState) as exc:  # deleted, or a client changed its state first
            log.info("auto-standby: instance %s (%s): standby not needed: %s", live.name, live.id, exc)
        except DomainError as exc:
            log.warning("auto-standby: instance %s (%s): standby failed: %s", live.name, live.id, exc)
            tracked.countdown.idle_since = self.clock()  # tried again after another idle_timeout
            await self._remember(live, tracked.countdown.memory())
        finally:
            tracked.attempt, tracked.phase = None, None
            tracked.cancelled = tracked.committing = False

    async def _precheck(self, live: LiveInstance, tracked: Tracked) -> None:
        """The last look, with the VM paused and saved: a connection that appeared since the
        last read (SYN_SENT included: the guest cannot answer while paused), or a hold, keeps
        the VM running. Passing it commits the standby."""
        policy = _enabled(live)
        if tracked.cancelled or policy is None or live.record.ip is None or self.flows is None:
            raise StandbyCancelled("a hold, a new connection or a policy change came first")
        try:
            address = IPv4Address(live.record.ip)
            flows = (await self.flows.inbound_tcp_flows([address])).get(address, [])
        except Exception as exc:
            raise StandbyCancelled(f"connection tracking could not be read: {exc}") from None
        now = self.clock()
        countdown = tracked.countdown
        countdown.observe(InboundFilter.of(live.record.ip, policy).inbound(flows), now)
        if tracked.cancelled:
            raise StandbyCancelled("a hold came first")
        if not countdown.due(_timeout(policy), now):
            raise StandbyCancelled(f"{countdown.active} inbound connection(s) appeared")
        tracked.committing = True

    # ---- instance events ----------------------------------------------------------------------

    def _on_event(self, event: InstanceEvent) -> None:
        """A start or restore begins a fresh countdown (at the next read); any other change
        drops what was tracked."""
        if event.kind in (EventKind.STARTED, EventKind.RESTORED, EventKind.CREATED):
            self._fresh.add(event.instance_id)
        elif event.kind is EventKind.DELETED:
            self._fresh.discard(event.instance_id)
        tracked = self._tracked.get(event.instance_id)
        if tracked is not None and tracked.attempt is None:
            self._forget(event.instance_id)

    # ---- the API's two calls -------------------------------------------------------------------

    async def status(self, ref: str) -> AutoStandbyStatus:
        live = self.manager.table.resolve(ref)
        return await self._status(live)

    async def _status(self, live: LiveInstance) -> AutoStandbyStatus:
        policy = live.record.auto_standby
        tracked = self._tracked.get(live.id)
        memory = tracked.countdown.memory() if tracked is not None else live.record.auto_standby_memory
        now = self.clock()
        hold = memory.hold_until if memory is not None else None
        shown = {
            "supported": self.supported,
            "configured": policy is not None,
            "enabled": policy is not None and policy.enabled,
            "tracking_mode": TRACKING_MODE,
            "idle_timeout": policy.idle_timeout if policy is not None else None,
            "hold_until": hold if hold is not None and hold > now else None,
        }

        def answer(status: str, reason: str, eligible: bool = False, **more: object) -> AutoStandbyStatus:
            return AutoStandbyStatus.model_validate({
                **shown, "status": status, "reason": reason, "eligible": eligible, **more})

        if not self.supported:
            return answer("unsupported", "unsupported_platform")
        if policy is None:
            return answer("disabled", "policy_missing")
        if not policy.enabled:
            return answer("disabled", "policy_disabled")
        reason = await self._ineligible(live, saving=tracked is not None and tracked.attempt is not None)
        if reason is not None:
            return answer("ineligible", reason)
        if tracked is None or tracked.countdown.seen is None:
            # Not read yet (it just started running): the countdown begins at the next read.
            if self.observer_error is not None:
                return answer("error", "observer_error", True)
            return answer("idle_countdown", "idle_timeout_not_elapsed", True)
        countdown = tracked.countdown
        due = countdown.next_standby_at(_timeout(policy))
        timing = {
            "active_inbound_connections": countdown.active,
            "idle_since": countdown.idle_since,
            "last_inbound_activity_at": countdown.last_activity,
            "next_standby_at": due,
            "countdown_remaining": format_duration(max(0.0, (due - now).total_seconds())) if due else None,
        }
        if tracked.requested:
            return answer("standby_requested", "ready_for_standby", True, **timing)
        if self.observer_error is not None:
            return answer("error", "observer_error", True, **timing)
        if countdown.active:
            return answer("active", "active_inbound_connections", True, **timing)
        if due is not None and due <= now:
            return answer("ready_for_standby", "ready_for_standby", True, **timing)
        return answer("idle_countdown", "idle_timeout_not_elapsed", True, **timing)

    async def hold(self, ref: str) -> AutoStandbyStatus:
        """Hold off auto-standby for the policy's ``idle_timeout`` from now (replacing any
        earlier hold) and give up a queued or unfinished attempt. 409 ``instance_in_standby``
        when the instance is in Standby or its standby is already being committed."""
        live = self.manager.table.resolve(ref)
        state = (await self.manager.reader.state(live)).state
        # Looked up after the await: the controller may have begun tracking it meanwhile.
        tracked = self._tracked.get(live.id)
        if state is InstanceState.STANDBY or (tracked is not None and tracked.committing):
            raise Conflict(f"instance {live.name} is in standby or entering it: restore it first",
                           code="instance_in_standby")
        policy = _enabled(live)
        if policy is None or not self.supported:
            return await self._status(live)  # no auto-standby will happen: nothing to hold
        hold_until = self.clock() + _timeout(policy)
        if tracked is not None:
            tracked.countdown.hold_until = hold_until
            self._cancel(tracked)
            memory = tracked.countdown.memory()
        else:
            memory = (live.record.auto_standby_memory or AutoStandbyMemory()).model_copy(
                update={"hold_until": hold_until})
        await self._remember(live, memory)
        if tracked is None and (begun := self._tracked.get(live.id)) is not None:
            # Tracking began from the record while the hold was being written: it holds too.
            begun.countdown.hold_until = hold_until
            self._cancel(begun)
        log.info("auto-standby: instance %s (%s) held until %s", live.name, live.id, hold_until)
        return await self._status(live)
