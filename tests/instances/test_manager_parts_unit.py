"""The instance manager's pure parts, without QEMU: the state rule, admission arithmetic, create
validation, the operations log's ordering, and the instance table's reference resolution."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hypemand.errors import BadRequest, Conflict, NotFound
from hypemand.guest.markers import ConsoleMarkers
from hypemand.hypervisor.base import Board, VMStatus
from hypemand.instances.admission import Demand, DiskClaim, check_capacity, open_disk_promise
from hypemand.instances.host import HostCapacity
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import CreateInstanceRequest, InstanceRecord, InstanceState, validate_name
from hypemand.instances.records import OperationsLog, phase_change
from hypemand.instances.state import Observed, StateReader, StateWatch, derive_state
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
        ({"disk_io_bps": "1MB/s"}, "not_supported"),
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


class CountingReader(StateReader):
    """A reader whose VM becomes Running after a number of reads, counting them."""

    def __init__(self, running_after: int) -> None:
        self.reads = 0
        self.running_after = running_after

    async def state(self, live: LiveInstance) -> Observed:
        self.reads += 1
        running = self.reads > self.running_after
        return Observed(InstanceState.RUNNING if running else InstanceState.INITIALIZING)


def test_many_waiters_share_one_observer(tmp_path: Path) -> None:
    """A hundred long-polls of one instance cost one read per tick, not one per waiter."""

    async def scenario() -> None:
        reader = CountingReader(running_after=100 + 8)  # every waiter's first look, then 8 ticks
        watch = StateWatch(reader)
        target = live(tmp_path, "abc", "web")
        results = await asyncio.gather(*(
            watch.until(target, lambda seen: seen.state is InstanceState.RUNNING, 5.0) for _ in range(100)
        ))
        assert all(seen.state is InstanceState.RUNNING and not timed_out for seen, timed_out in results)
        assert reader.reads <= 100 + 8 + 2, reader.reads

    asyncio.run(scenario())


def test_a_wait_that_times_out_says_so_with_the_last_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        watch = StateWatch(CountingReader(running_after=10**6))
        seen, timed_out = await watch.until(
            live(tmp_path, "abc", "web"), lambda seen: seen.state is InstanceState.RUNNING, 0.1
        )
        assert timed_out and seen.state is InstanceState.INITIALIZING

    asyncio.run(scenario())


def test_disk_admission_counts_what_instances_may_still_write() -> None:
    capacity = HostCapacity(cpus=2, memory_bytes=64 << 30, disk_bytes=100 << 30, disk_free_bytes=10 << 30)
    held = [Demand(0, 0, "d", disk=6 << 30)]  # e.g. a stopped instance's overlay still to grow
    check_capacity(capacity, held, Demand(1, 1 << 30, "d", disk=4 << 30))
    with pytest.raises(Conflict, match="disk requested") as refused:
        check_capacity(capacity, held, Demand(1, 1 << 30, "d", disk=(4 << 30) + 1))
    assert refused.value.code == "insufficient_resources"


def test_open_disk_promise_of_sparse_reserved_and_private_files(tmp_path: Path) -> None:
    overlay, memory = tmp_path / "overlay.raw", tmp_path / "memory.ram"
    with overlay.open("wb") as sparse:
        sparse.truncate(64 << 20)
        sparse.write(b"x" * (1 << 20))  # 1 MiB written at the start, the rest a hole
    used = overlay.stat().st_blocks * 512
    assert open_disk_promise(overlay, 64 << 20, None, 0) == (64 << 20) - used
    # A RAM file still to be made is promised in full; once reserved, nothing more.
    assert open_disk_promise(overlay, 64 << 20, memory, 32 << 20) == (64 << 20) - used + (32 << 20)
    with memory.open("wb") as ram:
        os.posix_fallocate(ram.fileno(), 0, 32 << 20)
    assert open_disk_promise(overlay, 64 << 20, memory, 32 << 20) == (64 << 20) - used
    # A fork maps a RAM file privately and never writes it: its claim leaves the file out.
    memory.unlink()
    memory.touch()
    claim = DiskClaim(overlay=overlay, overlay_bytes=64 << 20, memory_file=memory, memory_bytes=32 << 20,
                      standby_record=tmp_path / "standby.json")
    assert claim.open_promise(running=True, writes_memory_file=lambda _: False) == (64 << 20) - used
    assert claim.open_promise(running=True, writes_memory_file=lambda _: True) == (96 << 20) - used
    # Stopped (no VMM, no standby): only the overlay.
    assert claim.open_promise(running=False, writes_memory_file=lambda _: True) == (64 << 20) - used


@pytest.mark.parametrize("name", ["web\n", "web\nx", "-web", "web-", "Web", "", "a" * 64])
def test_instance_names_are_checked_whole(name: str) -> None:
    with pytest.raises(ValueError, match="lowercase letters"):
        validate_name(name)
