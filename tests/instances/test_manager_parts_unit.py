"""The instance manager's pure parts, without QEMU: the state rule, admission arithmetic, create
validation, the operations log's ordering, and the instance table's reference resolution."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hypemand.errors import BadRequest, Conflict, NotFound
from hypemand.guest.markers import ConsoleMarkers
from hypemand.hypervisor.base import Board, VMStatus
from hypemand.instances.admission import Demand, check_capacity
from hypemand.instances.host import HostCapacity
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import CreateInstanceRequest, InstanceRecord, InstanceState
from hypemand.instances.records import OperationsLog, phase_change
from hypemand.instances.state import derive_state
from hypemand.instances.validation import MIN_MEMORY, validate_create
from hypemand.layout import InstancePaths

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def record(**changes: object) -> InstanceRecord:
    base = InstanceRecord(
        id="a" * 24, name="web", image="img", image_digest="sha256:" + "0" * 64, platform="linux/amd64",
        board=Board.QEMU_MICROVM, vcpus=1, memory_bytes=256 << 20, overlay_bytes=64 << 20,
        mac="02:00:00:00:00:01", created_at=NOW, phase_since=NOW,
    )
    return base.model_copy(update=changes)


BOOTED = ConsoleMarkers(program_start_ts=1.0, agent_ready_ts=2.0)


@pytest.mark.parametrize(
    ("vmm_alive", "saved", "status", "markers", "rec", "expected"),
    [
        (False, False, None, None, record(), InstanceState.STOPPED),
        (False, True, None, None, record(), InstanceState.STANDBY),
        (True, False, VMStatus.EXITED, None, record(), InstanceState.STOPPED),
        (True, False, VMStatus.PAUSED, None, record(), InstanceState.PAUSED),
        (True, False, VMStatus.INMIGRATE, None, record(), InstanceState.PAUSED),
        (True, False, VMStatus.SHUTDOWN, None, record(), InstanceState.SHUTDOWN),
        (True, False, VMStatus.PRELAUNCH, None, record(), InstanceState.CREATED),
        (True, False, VMStatus.RUNNING, ConsoleMarkers(), record(), InstanceState.INITIALIZING),
        (True, False, VMStatus.RUNNING, ConsoleMarkers(program_start_ts=1.0), record(),
         InstanceState.INITIALIZING),
        (True, False, VMStatus.RUNNING, BOOTED, record(), InstanceState.RUNNING),
        # Without an agent, the program's start is enough.
        (True, False, VMStatus.RUNNING, ConsoleMarkers(program_start_ts=1.0), record(skip_guest_agent=True),
         InstanceState.RUNNING),
        # A restored VM continues a life whose markers were recorded before.
        (True, False, VMStatus.RUNNING, ConsoleMarkers(),
         record(program_started_at=NOW, agent_ready_at=NOW), InstanceState.RUNNING),
        # A running VMM with a stale standby record is what it runs as, not Standby.
        (True, True, VMStatus.RUNNING, BOOTED, record(), InstanceState.RUNNING),
    ],
)
def test_state_rule(
    vmm_alive: bool, saved: bool, status: VMStatus | None, markers: ConsoleMarkers | None,
    rec: InstanceRecord, expected: InstanceState,
) -> None:
    observed = derive_state(vmm_alive=vmm_alive, saved=saved, status=status, markers=markers, record=rec)
    assert observed.state is expected
    assert observed.error is None


def test_a_vmm_that_does_not_answer_is_unknown_with_the_reason() -> None:
    observed = derive_state(
        vmm_alive=True, saved=False, status=VMStatus.UNKNOWN, markers=None, record=record()
    )
    assert observed.state is InstanceState.UNKNOWN
    assert observed.error is not None and "no answer" in observed.error


CAPACITY = HostCapacity(cpus=2, memory_bytes=4 << 30, disk_bytes=100 << 30, disk_free_bytes=50 << 30)


def test_admission_oversubscribes_vcpus_four_times_and_memory_not_at_all() -> None:
    held = [Demand(4, 1 << 30, "d")]
    check_capacity(CAPACITY, held, Demand(4, 3 << 30, "d"))  # exactly at both limits
    with pytest.raises(Conflict, match="5 vCPUs requested, 4 of 8 available") as cpu:
        check_capacity(CAPACITY, held, Demand(5, 1 << 20, "d"))
    assert cpu.value.code == "insufficient_resources"
    with pytest.raises(Conflict, match="memory requested"):
        check_capacity(CAPACITY, held, Demand(1, (3 << 30) + 1, "d"))


def request(**fields: object) -> CreateInstanceRequest:
    return CreateInstanceRequest.model_validate({"name": "web", "image": "img", **fields})


def test_create_validation_turns_the_request_into_a_shape() -> None:
    shape = validate_create(
        request(size="512MB", overlay_size="1GB", vcpus=2, hypervisor="qemu", ttl="1h"),
        platform="linux/amd64", hotplug_memory=False,
    )
    assert (shape.board, shape.vcpus) == (Board.QEMU, 2)
    assert (shape.memory_bytes, shape.overlay_bytes) == (512 << 20, 1 << 30)
    assert shape.expires_at is not None and shape.expires_at > datetime.now(UTC) + timedelta(minutes=59)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"size": "lots"}, "invalid_size"),
        ({"size": f"{(MIN_MEMORY >> 20) - 1}MB"}, "invalid_size"),
        ({"overlay_size": "1MB"}, "invalid_overlay_size"),
        ({"hypervisor": "firecracker"}, "invalid_hypervisor"),
        ({"platform": "linux/arm64"}, "invalid_platform"),
        ({"hotplug_size": "1GB"}, "invalid_hotplug_size"),
        ({"ttl": "soon"}, "invalid_ttl"),
        ({"health_check": {"type": "tcp"}}, "not_supported"),
    ],
)
def test_create_validation_refuses_with_a_code_naming_the_field(fields: dict[str, object], code: str) -> None:
    with pytest.raises(BadRequest) as refused:
        validate_create(request(**fields), platform="linux/amd64", hotplug_memory=False)
    assert refused.value.code == code


def test_phase_change_adds_the_time_spent_to_the_phase_left() -> None:
    rec = record(phase="running", phase_since=NOW, phase_ms={"running": 500})
    changes = phase_change(rec, "stopped", NOW + timedelta(seconds=2))
    assert changes["phase"] == "stopped"
    assert changes["phase_ms"] == {"running": 2500}


def live(tmp_path: Path, instance_id: str, name: str) -> LiveInstance:
    return LiveInstance(record=record(id=instance_id, name=name), paths=InstancePaths(tmp_path / instance_id))


def test_references_resolve_by_id_then_name_then_unique_prefix(tmp_path: Path) -> None:
    table = InstanceTable()
    first, second = live(tmp_path, "abc111", "web"), live(tmp_path, "abc222", "abc111x")
    table.add(first)
    table.add(second)
    assert table.resolve("abc111") is first
    assert table.resolve("abc111x") is second  # an exact name before a prefix
    assert table.resolve("abc2") is second
    with pytest.raises(Conflict) as ambiguous:
        table.resolve("abc")
    assert ambiguous.value.code == "ambiguous"
    with pytest.raises(NotFound):
        table.resolve("zzz")


def test_operations_log_keeps_order_and_never_recreates_a_deleted_directory(tmp_path: Path) -> None:
    async def scenario() -> None:
        oplog = OperationsLog()
        kept, gone = live(tmp_path, "kept", "kept"), live(tmp_path, "gone", "gone")
        kept.paths.directory.mkdir()
        for number in range(200):
            oplog.write(kept, f"line {number}")
        oplog.write(gone, "a line for an instance whose directory is already gone")
        await oplog.flush()
        lines = kept.paths.operations_log.read_text().splitlines()
        assert [line.split(" ", 1)[1] for line in lines] == [f"line {n}" for n in range(200)]
        assert not gone.paths.directory.exists()
        gone.deleted = True
        oplog.write(gone, "after delete")  # dropped at once
        await oplog.close()

    asyncio.run(scenario())
