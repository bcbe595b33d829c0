"""State is never stored: every read derives it from what is real.

- no live VMM process: ``Standby`` if a standby record exists, else ``Stopped``;
- otherwise QEMU's run state (asked over QMP with a short bound, the answer shared by concurrent
  readers for a moment), and for a running guest the boot markers on its console:
  ``Initializing`` until the program started (and its agent answered, unless
  ``skip_guest_agent``), then ``Running``; a QMP that does not answer in time: ``Unknown`` with
  ``state_error``.

:func:`derive_state` is the rule, pure; :class:`StateReader` gathers its inputs and builds the
API's view of an instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from hypemand.errors import DomainError
from hypemand.guest.markers import ConsoleMarkers
from hypemand.hypervisor.base import DiskIOStatus, VMStatus
from hypemand.instances.live import LiveInstance
from hypemand.instances.models import GuestExitInfo, Instance, InstanceNetwork, InstanceRecord, InstanceState
from hypemand.instances.records import phase_change, utcnow
from hypemand.instances.volumes import view as volume_views
from hypemand.policies.models import InstanceHealthStatus
from hypemand.units import format_rate, format_size

STATUS_TIMEOUT = 1.0  # a QMP query-status slower than this makes the state Unknown
STATUS_TTL = 0.5  # readers within this window share one QMP answer
USER_NETWORK_IP = "10.0.2.15"


def network_view(record: InstanceRecord, *, holds_address: bool) -> InstanceNetwork:
    """The NIC as the API shows it: a bridge address only while the VM holds it (running,
    paused or in standby: a stopped VM has released it); QEMU's fixed user-mode address."""
    if not record.network_enabled:
        return InstanceNetwork(enabled=False)
    ip = (record.ip if holds_address else None) if record.ip is not None else USER_NETWORK_IP
    return InstanceNetwork(
        enabled=True,
        ip=ip,
        mac=record.mac,
        bandwidth_download=format_rate(record.bandwidth_download) if record.bandwidth_download else None,
        bandwidth_upload=format_rate(record.bandwidth_upload) if record.bandwidth_upload else None,
    )
IO_ERROR_MESSAGE = "paused by the hypervisor after a disk I/O error"
DISK_FULL_MESSAGE = (
    "disk full: the data directory's file system has no space left, so the guest is paused; "
    "it continues by itself once space is freed"
)

QEMU_TO_STATE = {
    VMStatus.PAUSED: InstanceState.PAUSED,
    VMStatus.INMIGRATE: InstanceState.PAUSED,
    VMStatus.POSTMIGRATE: InstanceState.PAUSED,
    VMStatus.FINISH_MIGRATE: InstanceState.PAUSED,
    VMStatus.SAVE_VM: InstanceState.PAUSED,
    VMStatus.RESTORE_VM: InstanceState.PAUSED,
    VMStatus.SUSPENDED: InstanceState.PAUSED,
    VMStatus.SHUTDOWN: InstanceState.SHUTDOWN,
    VMStatus.PRELAUNCH: InstanceState.CREATED,
    VMStatus.EXITED: InstanceState.STOPPED,
}


@dataclass(frozen=True)
class Observed:
    """What a read found: the state and, when it could not be read, why."""

    state: InstanceState
    error: str | None = None


def booted(markers: ConsoleMarkers, record: InstanceRecord) -> bool:
    """The program started (and its agent answered, unless skipped) in this VM's life: seen on
    this boot's console, or recorded (a restored VM continues a life whose markers were seen)."""
    program = markers.program_start_ts is not None or record.program_started_at is not None
    agent = markers.agent_ready_ts is not None or record.agent_ready_at is not None
    return program and (record.skip_guest_agent or agent)


def derive_state(
    *,
    vmm_alive: bool,
    saved: bool,
    status: VMStatus | None,
    markers: ConsoleMarkers | None,
    record: InstanceRecord,
) -> Observed:
    """The rule. ``status`` is QEMU's answer (None when no VMM runs); ``markers`` are needed only
    for a running guest (None before they were read)."""
    if not vmm_alive or status is VMStatus.EXITED:
        return Observed(InstanceState.STANDBY if saved and not vmm_alive else InstanceState.STOPPED)
    if status is None or status is VMStatus.UNKNOWN:
        return Observed(
            InstanceState.UNKNOWN, f"failed to query hypervisor: no answer within {STATUS_TIMEOUT:g} s"
        )
    if status in QEMU_TO_STATE:
        return Observed(QEMU_TO_STATE[status])
    if status is VMStatus.IO_ERROR:
        # QEMU paused the guest because a disk write failed; it continues once resumed.
        return Observed(InstanceState.PAUSED, IO_ERROR_MESSAGE)
    # running, or an error state QEMU still runs in: the boot markers decide.
    if markers is not None and booted(markers, record):
        return Observed(InstanceState.RUNNING)
    return Observed(InstanceState.INITIALIZING)


_NO_MARKERS_NEEDED = (VMStatus.UNKNOWN, VMStatus.EXITED, VMStatus.IO_ERROR)


def needs_markers(status: VMStatus) -> bool:
    return status not in QEMU_TO_STATE and status not in _NO_MARKERS_NEEDED


class StateReader:
    """Reads an instance's state from its VMM and console; never takes the instance's lock."""

    async def state(self, live: LiveInstance) -> Observed:
        if not live.vmm_alive():
            if live.handle is not None and live.exit_seen_at is None:
                # Ended, and the watcher has not recorded it yet: remember when it was first seen,
                # so this answer already has a stopped_at (and the record gets the same one).
                live.exit_seen_at = utcnow()
            # One stat of a small local file: cheaper than a thread hop on every read of a list.
            saved = live.paths.standby_record.exists()
            return derive_state(vmm_alive=False, saved=saved, status=None, markers=None, record=live.record)
        status = await self.vm_status(live)
        if status is VMStatus.EXITED or (status is VMStatus.UNKNOWN and not live.vmm_alive()):
            # Gone while we asked (ended, or a standby finished): read it as a VMM-less instance.
            saved = live.paths.standby_record.exists()
            return derive_state(vmm_alive=False, saved=saved, status=None, markers=None, record=live.record)
        markers = await self.markers(live) if needs_markers(status) else None
        record = live.record
        observed = derive_state(vmm_alive=True, saved=False, status=status, markers=markers, record=record)
        if status is VMStatus.IO_ERROR and await self.disk_full(live):
            return Observed(observed.state, DISK_FULL_MESSAGE)
        return observed

    async def disk_full(self, live: LiveInstance) -> bool:
        """Whether a VM in io-error stopped because its host file system is full."""
        handle = live.handle
        if handle is None:
            return False
        try:
            async with asyncio.timeout(STATUS_TIMEOUT):
                disks = await handle.disk_io_status()
        except (TimeoutError, DomainError):
            return False
        return DiskIOStatus.NOSPACE in disks.values()

    async def vm_status(self, live: LiveInstance) -> VMStatus:
        handle = live.handle
        if handle is None:
            return VMStatus.EXITED  # ended (or put in standby) since the caller looked
        now = time.monotonic()
        if live.status_of is not handle:
            live.forget_status()  # an answer about an earlier VMM says nothing about this one
            live.status_of = handle
        if live.status_value is not None and now - live.status_at < STATUS_TTL:
            return live.status_value
        if live.status_probe is None or live.status_probe.done():
            live.status_probe = asyncio.ensure_future(handle.status(timeout=STATUS_TIMEOUT))
        probe = live.status_probe
        try:
            async with asyncio.timeout(STATUS_TIMEOUT + 0.25):
                status = await asyncio.shield(probe)
        except TimeoutError:
            return VMStatus.UNKNOWN
        if live.status_of is handle and live.status_probe is probe:
            live.status_value, live.status_at = status, time.monotonic()
        return status

    async def markers(self, live: LiveInstance) -> ConsoleMarkers:
        if live.scanner is None:
            return ConsoleMarkers()
        return await live.scanner.scan()

    async def view(self, live: LiveInstance) -> Instance:
        observed = await self.state(live)
        state = observed.state
        record = live.record
        exit_info = record.exit
        if exit_info is None and state is InstanceState.STOPPED and live.scanner is not None:
            found = (await live.scanner.scan()).exit
            if found is not None:
                exit_info = GuestExitInfo(code=found.code, message=found.message)
        now = utcnow()
        # The watcher records a phase change within moments; until it has, show the state just
        # read, so that the phase and the state never disagree in one answer.
        phase = record
        if state.value.lower() != record.phase and state is not InstanceState.UNKNOWN:
            phase = record.model_copy(update=phase_change(record, state.value.lower(), now))
        phases = phase_change(phase, phase.phase, now)["phase_ms"]
        stopped = state is InstanceState.STOPPED
        # A crash (the VMM killed or failing, a guest kernel panic) is said where a client looks:
        # in state_error, and as the exit message when the program left none.
        crash = record.crash if stopped else None
        error = observed.error or crash
        exit_message = exit_info.message if exit_info else crash
        return Instance(
            id=record.id,
            name=record.name,
            image=record.image,
            state=state,
            state_error=error,
            created_at=record.created_at,
            expires_at=record.expires_at,
            platform=record.platform,
            size=format_size(record.memory_bytes),
            hotplug_size=format_size(record.hotplug_bytes) if record.hotplug_bytes else None,
            overlay_size=format_size(record.overlay_bytes),
            vcpus=record.vcpus,
            env=record.env,
            tags=record.tags,
            network=network_view(record, holds_address=not stopped),
            hypervisor=record.board.value,
            started_at=record.started_at,
            stopped_at=record.stopped_at or live.exit_seen_at if stopped else None,
            exit_code=exit_info.code if exit_info and stopped else None,
            exit_message=exit_message if stopped else None,
            has_snapshot=state is InstanceState.STANDBY,
            snapshot_policy=record.snapshot_policy,
            current_phase=phase.phase,
            current_phase_since=phase.phase_since,
            phase_durations_ms=phases,
            volumes=volume_views(record.volumes),
            health_check=record.health_check,
            health_status=health_view(live, state),
            restart_policy=record.restart_policy,
            restart_status=record.restart_status if record.restart_policy is not None else None,
            auto_standby=record.auto_standby,
        )


def health_view(live: LiveInstance, state: InstanceState) -> InstanceHealthStatus:
    """``health_status``: ``disabled`` without a check; what the monitor saw while the VM runs;
    ``unknown`` for a VM that does not run (nothing to check), ``starting`` before the first
    check of this boot."""
    check = live.record.health_check
    if check is None or not check.enabled:
        return InstanceHealthStatus(status="disabled")
    if state not in (InstanceState.RUNNING, InstanceState.INITIALIZING):
        return InstanceHealthStatus(status="unknown")
    if live.health is None:
        return InstanceHealthStatus(status="starting")
    return live.health


WAIT_POLL = 0.025  # a waiting client learns of a new state within this


@dataclass
class _Ticker:
    """One observer per instance while anyone waits on it; waiters wake only on a change."""

    changed: asyncio.Condition
    observed: Observed | None = None
    waiters: int = 0
    task: asyncio.Task[None] | None = None


class StateWatch:
    """Waits for states (``wait``, exec's wait for the agent) without each waiter asking the VM:
    a hundred clients long-polling one instance cost one read every ``WAIT_POLL``."""

    def __init__(self, reader: StateReader) -> None:
        self.reader = reader
        self._tickers: dict[int, _Ticker] = {}

    async def until(
        self, live: LiveInstance, done: Callable[[Observed], bool], timeout: float  # noqa: ASYNC109
    ) -> tuple[Observed, bool]:
        """The first state that satisfies ``done`` (and False), or the last one seen when
        ``timeout`` ran out (and True). Returns at once, too, when the instance is deleted."""
        observed = await self.reader.state(live)
        if done(observed) or live.deleted or timeout <= 0:
            return observed, not (done(observed) or live.deleted)
        ticker = self._ticker(live)
        ticker.waiters += 1
        try:
            async with asyncio.timeout(timeout), ticker.changed:
                while True:
                    await ticker.changed.wait()
                    observed = ticker.observed or observed
                    if done(observed) or live.deleted:
                        return observed, False
        except TimeoutError:
            return ticker.observed or observed, True
        finally:
            ticker.waiters -= 1

    async def close(self) -> None:
        """End every observer (the server is stopping; its waiting requests are cancelled)."""
        tasks = [ticker.task for ticker in self._tickers.values() if ticker.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _ticker(self, live: LiveInstance) -> _Ticker:
        key = id(live)
        ticker = self._tickers.get(key)
        if ticker is None or ticker.task is None or ticker.task.done():
            ticker = _Ticker(changed=asyncio.Condition())
            self._tickers[key] = ticker
            ticker.task = asyncio.create_task(self._tick(key, live, ticker), name=f"state-watch-{live.id}")
        return ticker

    async def _tick(self, key: int, live: LiveInstance, ticker: _Ticker) -> None:
        try:
            while ticker.waiters > 0:
                observed = await self.reader.state(live)
                if observed != ticker.observed or live.deleted:
                    ticker.observed = observed
                    async with ticker.changed:
                        ticker.changed.notify_all()
                if live.deleted:
                    break
                await asyncio.sleep(WAIT_POLL)
        finally:
            if self._tickers.get(key) is ticker:
                del self._tickers[key]
