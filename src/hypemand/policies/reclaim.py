"""Memory reclaim: ``POST /resources/memory/reclaim`` applied through the VMs' balloons, held for
``hold_for``, then given back (the plan itself is ``reclaim_plan``).

- **Per VM, under its lock** (``InstanceManager.locked_vm``): reading the balloon, and setting it,
  happen while no standby, stop or restore can swap the VMM. A standby saves the balloon in the
  VM's device state, so a reclaimed VM restores reclaimed. The lock is waited for at most
  ``LOCK_WAIT`` seconds: a VM busy longer (a graceful stop, a snapshot) is ``skipped``.
- **Only Running instances** take part (Initializing guests have no balloon driver yet).
- **The hold**: a request that applies sets one hold, ``hold_for`` from now (default 5m), kept
  in ``memory-reclaim-hold.json`` so a restarted server ends it too; a newer request replaces it,
  and ``reclaim_bytes: 0`` ends it at once. When it ends, every balloon is deflated (target back
  to the VM's full memory). A VM restored (or forked) while no hold is active is deflated too: its
  saved device state may hold an old balloon. A dry run changes nothing and sets no hold.
- **After an inflation**, a background task waits for the guest to reach its target and then
  reserves the RAM file's blocks again (the balloon punched them out; see ``hypervisor.storage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hypemand.errors import DomainError, NotFound
from hypemand.fsutil import write_model_atomic
from hypemand.hypervisor.base import VMHandle, VMMError
from hypemand.instances.events import EventKind, InstanceEvent
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import InstanceRecord
from hypemand.policies.clock import sleep_until
from hypemand.policies.reclaim_plan import (
    APPLIED,
    ERROR,
    PLANNED,
    SKIPPED,
    UNCHANGED,
    UNSUPPORTED,
    Candidate,
    MemoryReclaimAction,
    MemoryReclaimRequest,
    MemoryReclaimResponse,
    plan_targets,
    pressure_state,
    protected_floor,
    stepped,
)

log = logging.getLogger(__name__)

LOCK_WAIT = 5.0  # seconds a reclaim waits for a VM another operation holds
# An inflation is walked down in steps of INFLATE_STEP, each waited for: QEMU handles the pages
# the guest gives with its big lock held (a hole punched and a madvise per 4 KiB page, ~0.2 ms
# each here, ms under I/O load), so a guest inflating a large balloon in one go kept QMP from
# answering for seconds and the instance read as Unknown. 2 MiB is two of the guest's batches.
INFLATE_STEP = 2 << 20
INFLATE_POLL = 0.05  # how often an inflating step is looked at
INFLATE_STALL = 100  # polls without progress after which the guest is taken to be done (5 s)


class ReclaimHold(BaseModel):
    """``memory-reclaim-hold.json``."""

    reclaim_bytes: int
    until: datetime
    reason: str | None = None
    set_at: datetime
    # Each VM's target (instance id -> bytes): a server that restarts while a balloon is being
    # walked down finishes the walk.
    targets: dict[str, int] = {}


def read_meminfo() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of the host, in bytes."""
    values: dict[str, int] = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            if key in ("MemAvailable", "MemTotal"):
                values[key] = int(rest.split()[0]) * 1024
    return values["MemAvailable"], values["MemTotal"]


@dataclass(frozen=True)
class _Seen:
    """A VM that takes part, as the survey found it: its VMM (pid) and its guest memory target."""

    record: InstanceRecord
    pid: int
    current: int


class MemoryReclaimer:
    def __init__(self, manager: InstanceManager, hold_path: Path) -> None:
        self._manager = manager
        self._hold_path = hold_path
        self._hold: ReclaimHold | None = None
        self._lock = asyncio.Lock()  # one reclaim, expiry or deflate pass at a time
        self._expiry: asyncio.Task[None] | None = None
        # The target this server set on each VMM (instance id -> (QEMU pid, bytes)): a guest
        # still inflating reports more than it was asked for.
        self._targets: dict[str, tuple[int, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflating: dict[str, asyncio.Task[None]] = {}
        # The target each VM is held at while the hold lasts, across standby and restore.
        self._goals: dict[str, int] = {}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._hold = await asyncio.to_thread(self._load_hold)
        self._manager.events.subscribe(self._on_event)
        if self._hold is not None and self._hold.until > datetime.now(UTC):
            self._schedule_expiry(self._hold)
            self._goals = dict(self._hold.targets)
            for instance_id in self._goals:
                self._spawn(self._resume_walk(instance_id), f"memory-reclaim-resume-{instance_id}")
        else:
            # No hold (or one that ended while no server ran): balloons a killed server left
            # inflated are given back.
            self._spawn(self._end_hold(), "memory-reclaim-deflate")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._expiry] if self._expiry else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def hold(self) -> ReclaimHold | None:
        return self._hold

    # --- the request --------------------------------------------------------------------

    async def reclaim(self, request: MemoryReclaimRequest) -> MemoryReclaimResponse:
        async with self._lock:
            available, total = await asyncio.to_thread(read_meminfo)
            actions, seen = await self._survey()
            candidates = [Candidate(vm_id, vm.record.memory_bytes, vm.current) for vm_id, vm in seen.items()]
            plan = plan_targets(candidates, request.reclaim_bytes)
            for vm_id, vm in seen.items():
                actions.append(await self._act(vm_id, vm, plan.get(vm_id), request.dry_run))
            if not request.dry_run:
                await self._set_hold(request)
            actions.sort(key=lambda action: action.instance_name)
            log.info(
                "memory reclaim of %d bytes%s (reason: %s): %s",
                request.reclaim_bytes,
                " (dry run)" if request.dry_run else "",
                request.reason or "-",
                ", ".join(f"{a.instance_name} {a.status}" for a in actions) or "no running VM",
            )
            return MemoryReclaimResponse(
                requested_reclaim_bytes=request.reclaim_bytes,
                planned_reclaim_bytes=sum(
                    a.assigned_memory_bytes - a.planned_target_guest_memory_bytes for a in actions
                ),
                applied_reclaim_bytes=sum(a.applied_reclaim_bytes for a in actions),
                host_available_bytes=available,
                host_pressure_state=pressure_state(available, total),
                hold_until=self._hold.until if self._hold is not None else None,
                actions=actions,
            )

    async def _survey(self) -> tuple[list[MemoryReclaimAction], dict[str, _Seen]]:
        """Every Running instance: its guest memory now and whether its balloon can grow; the
        actions of those that cannot take part (unsupported, skipped)."""
        actions: list[MemoryReclaimAction] = []
        seen: dict[str, _Seen] = {}
        for record, running, _claim in self._manager.allocations():
            if not running or (await self._instance_state(record.id)) != "Running":
                continue
            try:
                async with self._locked_vm(record.id) as handle:
                    if handle is None:
                        continue
                    refusal = handle.balloon_refusal(inflate=True)
                    if refusal is None:
                        seen[record.id] = _Seen(record, handle.pid, await self._current(record.id, handle))
            except (TimeoutError, DomainError) as exc:
                actions.append(_action(record, record.memory_bytes, record.memory_bytes, SKIPPED, _why(exc)))
                continue
            if refusal is not None:
                actions.append(
                    _action(record, record.memory_bytes, record.memory_bytes, UNSUPPORTED, refusal)
                )
        return actions, seen

    async def _act(self, vm_id: str, vm: _Seen, planned: int | None, dry_run: bool) -> MemoryReclaimAction:
        assigned = vm.record.memory_bytes
        target = max(protected_floor(assigned), min(assigned, stepped(vm.current, planned or assigned)))
        if dry_run:
            return _action(
                vm.record,
                vm.current,
                target,
                PLANNED if target != vm.current else UNCHANGED,
                None,
                after=vm.current,
            )
        if target == vm.current:
            return _action(vm.record, vm.current, target, UNCHANGED, None, after=vm.current)
        try:
            async with self._locked_vm(vm_id) as handle:
                if handle is None or handle.pid != vm.pid:
                    return _action(
                        vm.record,
                        vm.current,
                        target,
                        SKIPPED,
                        "the VM stopped running meanwhile",
                        after=vm.current,
                    )
                await self._walk_to(vm_id, handle, vm.current, target)
        except (TimeoutError, DomainError, OSError) as exc:
            status = SKIPPED if isinstance(exc, TimeoutError | NotFound) else ERROR
            return _action(vm.record, vm.current, target, status, _why(exc), after=vm.current)
        return _action(vm.record, vm.current, target, APPLIED, None, after=target)

    # --- the hold -----------------------------------------------------------------------

    async def _set_hold(self, request: MemoryReclaimRequest) -> None:
        now = datetime.now(UTC)
        if request.reclaim_bytes == 0:
            hold = None
        else:
            hold = ReclaimHold(
                reclaim_bytes=request.reclaim_bytes,
                reason=request.reason,
                set_at=now,
                until=now + timedelta(seconds=request.hold_seconds),
                targets=dict(self._goals),
            )
        await asyncio.to_thread(self._save_hold, hold)
        self._hold = hold
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if hold is not None:
            self._schedule_expiry(hold)

    def _schedule_expiry(self, hold: ReclaimHold) -> None:
        async def expire() -> None:
            await sleep_until(hold.until)  # the wall clock's moment (policies/clock.py)
            async with self._lock:
                if self._hold is hold:  # not replaced meanwhile
                    log.info("memory reclaim hold ended (set %s, reason: %s): deflating the balloons",
                             hold.set_at.isoformat(), hold.reason or "-")
                    await asyncio.to_thread(self._save_hold, None)
                    self._hold = None
                    await self._deflate_all()

        self._expiry = asyncio.get_running_loop().create_task(expire(), name="memory-reclaim-expiry")

    async def _end_hold(self) -> None:
        async with self._lock:
            if self._hold is None:
                await asyncio.to_thread(self._save_hold, None)
                await self._deflate_all()

    async def _deflate_all(self) -> None:
        for record, running, _claim in self._manager.allocations():
            if running:
                await self._deflate(record)

    async def _deflate(self, record: InstanceRecord) -> None:
        """The VM's balloon back to nothing, if it holds anything (caller holds ``_lock``)."""
        inflating = self._inflating.pop(record.id, None)
        if inflating is not None:
            inflating.cancel()
        try:
            async with self._locked_vm(record.id) as handle:
                if handle is None or handle.balloon_refusal(inflate=False) is not None:
                    return
                if await self._current(record.id, handle) < record.memory_bytes:
                    await handle.set_guest_memory_target(record.memory_bytes)
                    log.info("memory reclaim: %s deflated to %d MiB", record.name, record.memory_bytes >> 20)
                self._targets.pop(record.id, None)
                self._goals.pop(record.id, None)
        except (TimeoutError, DomainError, OSError) as exc:
            log.warning("memory reclaim: deflating %s failed: %s", record.name, _why(exc))

    def _on_event(self, event: InstanceEvent) -> None:
        vm_id = event.instance_id
        if event.kind in (EventKind.STOPPED, EventKind.EXITED, EventKind.DELETED, EventKind.STANDBY):
            self._targets.pop(vm_id, None)
            if event.kind is not EventKind.STANDBY:
                self._goals.pop(vm_id, None)
        elif event.kind in (EventKind.RESTORED, EventKind.CREATED) and self._hold is None:
            self._spawn(self._deflate_restored(vm_id), f"memory-reclaim-deflate-{vm_id}")
        elif event.kind is EventKind.RESTORED and vm_id in self._goals:
            # Saved while its balloon was still being walked down: carry on.
            self._spawn(self._resume_walk(vm_id), f"memory-reclaim-resume-{vm_id}")

    async def _resume_walk(self, instance_id: str) -> None:
        async with self._lock:
            goal = self._goals.get(instance_id)
            if self._hold is None or goal is None:
                return
            try:
                async with self._locked_vm(instance_id) as handle:
                    if handle is not None and handle.balloon_refusal(inflate=True) is None:
                        await self._walk_to(instance_id, handle, await handle.guest_memory_bytes(), goal)
            except (TimeoutError, DomainError, OSError) as exc:
                log.info("memory reclaim: resuming %s's balloon failed: %s", instance_id, _why(exc))

    async def _deflate_restored(self, instance_id: str) -> None:
        async with self._lock:
            if self._hold is None:
                with contextlib.suppress(NotFound):
                    await self._deflate(self._manager.record_of(instance_id))

    # --- helpers ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked_vm(self, instance_id: str) -> AsyncIterator[VMHandle | None]:
        async with asyncio.timeout(LOCK_WAIT) as limit, self._manager.locked_vm(instance_id) as handle:
            limit.reschedule(None)  # only the wait for the lock is bounded
            yield handle

    async def _instance_state(self, instance_id: str) -> str | None:
        try:
            return str((await self._manager.get(instance_id)).state)
        except DomainError:
            return None

    async def _current(self, instance_id: str, handle: VMHandle) -> int:
        recorded = self._targets.get(instance_id)
        if recorded is not None and recorded[0] == handle.pid:
            return recorded[1]
        return await handle.guest_memory_bytes()

    async def _walk_to(self, instance_id: str, handle: VMHandle, current: int, target: int) -> None:
        """Set the VM's target (caller holds the instance's lock): a deflation at once, an
        inflation by its first step, the rest walked in the background."""
        previous = self._inflating.pop(instance_id, None)
        if previous is not None:
            previous.cancel()
        self._targets[instance_id] = (handle.pid, target)
        self._goals[instance_id] = target
        if target >= current:
            await handle.set_guest_memory_target(target)
            return
        first = max(target, current - INFLATE_STEP)
        await handle.set_guest_memory_target(first)
        self._inflating[instance_id] = self._spawn(
            self._inflate(instance_id, handle, first, target), f"memory-reclaim-inflate-{instance_id}"
        )

    async def _inflate(self, instance_id: str, handle: VMHandle, step: int, target: int) -> None:
        """Walk the guest's balloon from ``step`` (already set) down to ``target`` one step at a
        time (each set under the instance's lock, on this VMM only), then reserve the RAM file's
        blocks again. Ends early when the VMM goes, or when the guest stops taking pages
        (deflate-on-OOM, no free memory)."""
        try:
            while await self._reached(handle, step) and step > target:
                step = max(target, step - INFLATE_STEP)
                async with self._locked_vm(instance_id) as current:
                    if current is not handle:
                        return
                    await handle.set_guest_memory_target(step)
            await handle.reserve_guest_memory()
        except (TimeoutError, DomainError, OSError) as exc:  # the VM ended meanwhile, or a full disk
            log.info("memory reclaim: inflating %s stopped: %s", handle.vm_id, _why(exc))

    async def _reached(self, handle: VMHandle, step: int) -> bool:
        """Whether the guest's balloon reached ``step`` (False: it stopped taking pages)."""
        last, stalled = None, 0
        while (now := await handle.guest_memory_bytes()) > step:
            stalled = stalled + 1 if now == last else 0
            if stalled >= INFLATE_STALL:
                return False
            last = now
            await asyncio.sleep(INFLATE_POLL)
        return True

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _load_hold(self) -> ReclaimHold | None:
        try:
            return ReclaimHold.model_validate_json(self._hold_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring an unreadable %s", self._hold_path)
            return None

    def _save_hold(self, hold: ReclaimHold | None) -> None:
        if hold is None:
            self._hold_path.unlink(missing_ok=True)
        else:
            write_model_atomic(self._hold_path, hold)


def _action(
    record: InstanceRecord,
    previous: int,
    planned: int,
    status: str,
    error: str | None,
    *,
    after: int | None = None,
) -> MemoryReclaimAction:
    target = previous if after is None else after
    return MemoryReclaimAction(
        instance_id=record.id,
        instance_name=record.name,
        hypervisor=record.board.value,
        assigned_memory_bytes=record.memory_bytes,
        protected_floor_bytes=protected_floor(record.memory_bytes),
        previous_target_guest_memory_bytes=previous,
        planned_target_guest_memory_bytes=planned,
        target_guest_memory_bytes=target,
        applied_reclaim_bytes=record.memory_bytes - target,
        status=status,
        error=error,
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"busy: another operation held the instance for more than {LOCK_WAIT:g}s"
    if isinstance(exc, VMMError):
        return f"the VMM did not answer: {exc}"
    return str(exc)
