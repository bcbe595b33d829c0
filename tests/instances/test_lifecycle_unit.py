"""The lifecycle's failure paths against a fake VMM (no QEMU): a boot whose record cannot be
written ends the VMM it launched and leaves the record as it was; a delete waits for a record
write already under way, so the deleted directory is not brought back."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hypemand.errors import InsufficientStorage
from hypemand.hypervisor.base import (
    Board,
    DiskIOStatus,
    ShutdownOutcome,
    VMConfig,
    VMHandle,
    VMStatus,
)
from hypemand.images.models import ReadyImage
from hypemand.instances import lifecycle as lifecycle_module
from hypemand.instances import records
from hypemand.instances.admission import Admission
from hypemand.instances.agents import AgentLinks
from hypemand.instances.boot import LaunchedGuest
from hypemand.instances.host import HostCapacity
from hypemand.instances.lifecycle import Lifecycle
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import InstanceRecord
from hypemand.instances.networking import Networking
from hypemand.instances.records import OperationsLog
from hypemand.instances.state import StateReader
from hypemand.layout import InstancePaths

NOW = datetime(2026, 12, 7, tzinfo=UTC)


class FakeVMM(VMHandle):
    """A VMM that runs until killed."""

    def __init__(self, directory: Path) -> None:
        self.config = VMConfig(vm_id="fake", directory=directory, kernel=directory / "k",
                               initrd=directory / "i", memory_mib=128)
        self.alive = True
        self.killed = False
        self.ended = asyncio.Event()

    @property
    def pid(self) -> int:
        return 4242

    def is_alive(self) -> bool:
        return self.alive

    async def status(self, timeout: float = 2.0) -> VMStatus:  # noqa: ASYNC109
        return VMStatus.RUNNING if self.alive else VMStatus.EXITED

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def shutdown(self, timeout: float = 10.0) -> ShutdownOutcome:  # noqa: ASYNC109
        await self.kill()
        return ShutdownOutcome.KILLED

    async def kill(self, keep_memory: bool = False) -> None:
        self.killed, self.alive = True, False
        self.ended.set()

    async def wait_exit(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        try:
            await asyncio.wait_for(self.ended.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def disk_io_status(self) -> dict[str, DiskIOStatus]:
        return {}

    async def close(self) -> None: ...


def make(tmp_path: Path) -> tuple[Lifecycle, LiveInstance, InstanceTable]:
    table = InstanceTable()
    capacity = HostCapacity(cpus=2, memory_bytes=8 << 30, disk_bytes=100 << 30, disk_free_bytes=50 << 30)
    admission = Admission(table, lambda: capacity, lambda _: True)
    no_jobs: Any = SimpleNamespace(cancel_for_instance=lambda _id: asyncio.sleep(0))
    no_images: Any = SimpleNamespace(release=lambda _digest: asyncio.sleep(0))
    unused: Any = None  # launch_guest is replaced: the hypervisor and system files are not used
    lifecycle = Lifecycle(
        table=table, hypervisor=unused, images=no_images, system=lambda: unused,
        admission=admission, reader=StateReader(), agents=AgentLinks(), oplog=OperationsLog(),
        compression=no_jobs, network=Networking(table, None, None, "no network in this test"),
    )
    record = InstanceRecord(
        id="a" * 24, name="web", image="img", image_digest="sha256:" + "0" * 64, platform="linux/amd64",
        board=Board.QEMU_MICROVM, vcpus=1, memory_bytes=128 << 20, overlay_bytes=64 << 20,
        mac="02:00:00:00:00:01", created_at=NOW, phase_since=NOW, phase="stopped",
        program_started_at=NOW, agent_ready_at=NOW,  # the last boot's history
    )
    paths = InstancePaths(tmp_path / record.id)
    paths.directory.mkdir()
    live = LiveInstance(record=record, paths=paths)
    table.add(live)
    return lifecycle, live, table


IMAGE = ReadyImage(name="img", digest="sha256:" + "0" * 64, platform=None, disk_path=Path("/nonexistent"),
                   disk_format="ext4", size_bytes=0)


def test_a_boot_whose_record_cannot_be_written_ends_its_vmm(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    lifecycle, live, _ = make(tmp_path)
    vmm = FakeVMM(live.paths.directory)

    async def launched(*_: object) -> LaunchedGuest:
        return LaunchedGuest(handle=vmm, console_offset=0)

    async def disk_full(_: LiveInstance) -> None:
        raise InsufficientStorage("no space left on the data disk to write instance.json")

    monkeypatch.setattr(lifecycle_module, "launch_guest", launched)
    monkeypatch.setattr(records, "save", disk_full)

    async def scenario() -> None:
        before = live.record
        with pytest.raises(InsufficientStorage):
            await lifecycle.boot(live, IMAGE)
        assert vmm.killed, "the VMM of a boot that was not recorded must not run on"
        assert live.handle is None
        assert live.record == before, "the record is what it was"
        assert live.watcher is not None
        await asyncio.wait_for(live.watcher, 5)

    asyncio.run(scenario())


def test_a_boot_shows_its_own_history_to_the_watcher_from_the_start(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The last boot's markers (program started, agent ready) must not make this one Running."""
    lifecycle, live, _ = make(tmp_path)
    vmm = FakeVMM(live.paths.directory)
    seen: list[InstanceRecord] = []

    async def launched(*_: object) -> LaunchedGuest:
        return LaunchedGuest(handle=vmm, console_offset=0)

    async def saving(target: LiveInstance) -> None:
        seen.append(target.record)  # what everyone sees while the record is being written

    monkeypatch.setattr(lifecycle_module, "launch_guest", launched)
    monkeypatch.setattr(records, "save", saving)

    async def scenario() -> None:
        await lifecycle.boot(live, IMAGE)
        (record,) = seen
        assert record.program_started_at is None and record.agent_ready_at is None
        assert record.phase == "initializing" and record.provisioned
        await vmm.kill()
        assert live.watcher is not None
        await asyncio.wait_for(live.watcher, 5)

    asyncio.run(scenario())


def test_a_delete_waits_for_a_record_write_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write in a worker thread cannot be cancelled: the delete must let it finish before the
    directory goes, or the write brings the directory back."""
    lifecycle, live, table = make(tmp_path)
    release = threading.Event()
    started = threading.Event()

    def slow_write(path: Path, model: object) -> None:
        started.set()
        release.wait(5)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")

    monkeypatch.setattr(records, "write_model_atomic", slow_write)

    async def scenario() -> None:
        writing = asyncio.create_task(records.note(live, tags={"a": "b"}))
        await asyncio.to_thread(started.wait, 5)
        deleting = asyncio.create_task(lifecycle.delete(live, graceful=False))
        await asyncio.sleep(0.05)  # part of the test: time in which an unguarded delete removes
        assert live.paths.directory.exists()
        release.set()
        await asyncio.gather(writing, deleting)
        assert not live.paths.directory.exists(), "the deleted directory came back"
        assert table.get(live.id) is None

    asyncio.run(scenario())
