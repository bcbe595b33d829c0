"""The auto-standby controller's own rules, driven pass by pass with a clock of the test's and a
stand-in for the instance manager whose standbys wait until the test lets them go: the cap on
concurrent standbys (the others queue), a hold cancelling a queued attempt, a connection seen by
the last check before the commit keeping the VM running, 409 while a standby is committed, the
countdown kept in the record and resumed by a new controller. (The real path, QEMU and
conntrack included, is tests/autostandby/test_autostandby_vm.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from hypemand.errors import Conflict
from hypemand.hypervisor.base import Board
from hypemand.instances.events import InstanceEvents
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import InstanceRecord, InstanceState, StandbyInstanceRequest
from hypemand.instances.records import load_record
from hypemand.instances.state import Observed
from hypemand.layout import InstancePaths
from hypemand.network.conntrack import TCP_STATE_ESTABLISHED, TcpFlow
from hypemand.policies.autostandby import AutoStandbyController
from hypemand.policies.models import AutoStandbyPolicy

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Reader:
    def __init__(self) -> None:
        self.states: dict[str, InstanceState] = {}

    async def state(self, live: LiveInstance) -> Observed:
        return Observed(self.states.get(live.id, InstanceState.RUNNING))


class Manager:
    """What the controller uses of InstanceManager; each standby waits for ``gate`` before its
    precheck and for ``commit_gate`` after it."""

    def __init__(self) -> None:
        self.table = InstanceTable()
        self.reader = Reader()
        self.events = InstanceEvents()
        self.gate = asyncio.Event()
        self.commit_gate = asyncio.Event()
        self.commit_gate.set()
        self.running = 0
        self.peak = 0
        self.done: list[str] = []

    async def standby(self, ref: str, request: StandbyInstanceRequest, *, manual: bool,
                      precheck: Callable[[], Awaitable[None]]) -> None:
        assert not manual
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            await precheck()
            await self.commit_gate.wait()
            self.reader.states[ref] = InstanceState.STANDBY
            self.done.append(ref)
        finally:
            self.running -= 1


class Flows:
    def __init__(self) -> None:
        self.flows: list[TcpFlow] = []

    async def inbound_tcp_flows(self, servers: Collection[IPv4Address]) -> dict[IPv4Address, list[TcpFlow]]:
        return {server: [flow for flow in self.flows if flow.server == server] for server in servers}

    def close(self) -> None:
        pass


def instance(root: Path, number: int) -> LiveInstance:
    instance_id = f"inst{number:020d}"
    directory = root / instance_id
    directory.mkdir(parents=True)
    record = InstanceRecord(
        id=instance_id, name=f"vm{number}", image="demo", image_digest="sha256:0", platform="linux/amd64",
        board=Board.QEMU, vcpus=1, memory_bytes=1 << 28, overlay_bytes=1 << 26, mac="02:00:00:00:00:01",
        ip=f"10.100.0.{number + 10}", created_at=T0, phase_since=T0, provisioned=True,
        auto_standby=AutoStandbyPolicy(enabled=True, idle_timeout="30s"),
    )
    return LiveInstance(record=record, paths=InstancePaths(directory))


World = tuple[AutoStandbyController, Manager, Flows, Clock, list[LiveInstance]]


def world(tmp_path: Path, count: int, max_concurrent: int = 16) -> World:
    manager, flows, clock = Manager(), Flows(), Clock()
    lives = [instance(tmp_path, n) for n in range(count)]
    for live in lives:
        manager.table.add(live)
    controller = AutoStandbyController(manager, flows, max_concurrent=max_concurrent, clock=clock)  # type: ignore[arg-type]
    return controller, manager, flows, clock, lives


async def settle() -> None:
    """Let every task that can run, run (record writes run in threads: given a moment)."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for what the controller's tasks do (a poll, with a bound far beyond any need)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the controller never got there")




def connection_to(live: LiveInstance) -> TcpFlow:
    vm = IPv4Address(live.record.ip or "")
    return TcpFlow(7, IPv4Address("10.100.0.1"), 40000, vm, 80, vm, 80, TCP_STATE_ESTABLISHED)


async def test_at_most_max_concurrent_standbys_run_and_the_others_queue(tmp_path: Path) -> None:
    controller, manager, _, clock, lives = world(tmp_path, 3, max_concurrent=2)
    await controller.tick()  # idle from T0
    clock.advance(31)
    await controller.tick()
    await until(lambda: manager.running == 2)
    await settle()
    assert manager.running == 2  # not 3
    statuses = [await controller.status(live.id) for live in lives]
    assert [s.status for s in statuses] == ["standby_requested"] * 3
    manager.gate.set()
    await until(lambda: len(manager.done) == 3)
    assert sorted(manager.done) == sorted(live.id for live in lives) and manager.peak == 2
    await controller.close()


async def test_a_hold_cancels_a_queued_attempt(tmp_path: Path) -> None:
    controller, manager, _, clock, (first, second) = world(tmp_path, 2, max_concurrent=1)
    await controller.tick()
    clock.advance(31)
    await controller.tick()
    await until(lambda: manager.running == 1)
    held = await controller.hold(second.id)
    assert held.hold_until == clock.now + timedelta(seconds=30)
    assert (held.status, held.reason) == ("idle_countdown", "idle_timeout_not_elapsed")
    manager.gate.set()
    await until(lambda: manager.done == [first.id])
    await settle()
    assert manager.done == [first.id] and manager.peak == 1
    # The hold is in the record, and ends: then the countdown ends too.
    record = load_record(second.paths.record)
    assert record is not None and record.auto_standby_memory is not None
    assert record.auto_standby_memory.hold_until == held.hold_until
    clock.advance(31)
    await controller.tick()
    await until(lambda: manager.done == [first.id, second.id])
    await controller.close()


async def test_a_connection_seen_by_the_last_check_keeps_it_running(tmp_path: Path) -> None:
    controller, manager, flows, clock, (live,) = world(tmp_path, 1)
    await controller.tick()
    clock.advance(31)
    await controller.tick()
    await until(lambda: manager.running == 1)
    flows.flows = [connection_to(live)]  # appears while the VM is paused for its standby
    manager.gate.set()
    await until(lambda: manager.running == 0)
    await settle()
    assert manager.done == []
    status = await controller.status(live.id)
    assert (status.status, status.active_inbound_connections) == ("active", 1)
    await controller.close()


async def test_hold_while_the_standby_is_committed_is_409_instance_in_standby(tmp_path: Path) -> None:
    controller, manager, _, clock, (live,) = world(tmp_path, 1)
    manager.gate.set()
    manager.commit_gate.clear()
    await controller.tick()
    clock.advance(31)
    await controller.tick()
    await until(lambda: manager.running == 1)
    await settle()
    with pytest.raises(Conflict) as refused:
        await controller.hold(live.id)
    assert refused.value.code == "instance_in_standby"
    manager.commit_gate.set()
    await until(lambda: manager.done == [live.id])
    with pytest.raises(Conflict):
        await controller.hold(live.id)
    await controller.close()


async def test_the_countdown_is_kept_in_the_record_and_a_new_controller_resumes_it(tmp_path: Path) -> None:
    controller, manager, _, clock, (live,) = world(tmp_path, 1)
    await controller.tick()
    record = load_record(live.paths.record)
    assert record is not None and record.auto_standby_memory is not None
    assert record.auto_standby_memory.idle_since == T0
    await controller.close()
    # A server restart: the record is what the next controller knows.
    live.record = record
    clock.advance(20)
    again = AutoStandbyController(manager, Flows(), clock=clock)  # type: ignore[arg-type]
    await again.tick()
    status = await again.status(live.id)
    assert status.idle_since == T0 and status.next_standby_at == T0 + timedelta(seconds=30)
    assert status.countdown_remaining == "10s"
    await again.close()
