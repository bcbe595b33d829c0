"""The snapshot service against a stand-in instance domain (no QEMU): forks of one snapshot run
side by side (only making its files ready is one at a time), and a delete waits for the forks
that use the snapshot's files."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypemand.hypervisor.base import Board
from hypemand.instances.models import InstanceRecord, InstanceState
from hypemand.instances.saved import SavedVM
from hypemand.layout import DataLayout
from hypemand.savedvm.files import SavedVMFiles
from hypemand.savedvm.jobs import CompressionJobs
from hypemand.snapshots.models import ForkSnapshotRequest, Snapshot, SnapshotRecord
from hypemand.snapshots.service import SnapshotService

NOW = datetime(2026, 12, 7, tzinfo=UTC)
SNAPSHOT_ID = "s" * 24


class Forks:
    """The instance domain's side of a fork: each one waits until it is let go."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.inside = 0
        self.most_inside = 0
        self.all_inside = asyncio.Event()
        self.go = asyncio.Event()

    async def fork(self, source: SavedVM, name: str, target: InstanceState, board: Board | None) -> Any:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        if self.inside == self.expected:
            self.all_inside.set()
        try:
            await self.go.wait()
        finally:
            self.inside -= 1
        return name

    def available_boards(self) -> list[Board]:
        return [Board.QEMU_MICROVM, Board.QEMU]


def stored_snapshot(layout: DataLayout) -> None:
    """A Stopped snapshot on disk: one payload file and its digest."""
    paths = layout.snapshot(SNAPSHOT_ID)
    paths.payload.directory.mkdir(parents=True)
    (paths.payload.directory / "overlay.raw").write_bytes(b"disk" * 1024)
    instance = InstanceRecord(
        id="i" * 24, name="source", image="img", image_digest="sha256:" + "0" * 64, platform="linux/amd64",
        board=Board.QEMU_MICROVM, vcpus=1, memory_bytes=128 << 20, overlay_bytes=64 << 20,
        mac="02:00:00:00:00:01", created_at=NOW, phase_since=NOW,
    )
    snapshot = Snapshot(id=SNAPSHOT_ID, kind="Stopped", created_at=NOW, size_bytes=4096,
                        source_instance_id=instance.id, source_instance_name=instance.name,
                        source_hypervisor="qemu-microvm")
    record = SnapshotRecord(snapshot=snapshot, instance=instance, qemu_version="7.2",
                            digests=SavedVMFiles(paths.payload).digests())
    paths.record.write_text(record.model_dump_json())


def test_forks_of_one_snapshot_run_side_by_side_and_a_delete_waits_for_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        layout = DataLayout(tmp_path)
        stored_snapshot(layout)
        forks = Forks(expected=4)
        instances: Any = forks
        service = SnapshotService(layout, instances, CompressionJobs())
        await service.start()
        running = [
            asyncio.create_task(service.fork(SNAPSHOT_ID, ForkSnapshotRequest(name=f"fork-{n}")))
            for n in range(4)
        ]
        async with asyncio.timeout(10):
            await forks.all_inside.wait()  # every fork reaches the instance domain at once
        deleting = asyncio.create_task(service.delete(SNAPSHOT_ID))
        await asyncio.sleep(0.05)  # part of the test: time in which an unguarded delete removes
        assert not deleting.done()
        assert layout.snapshot(SNAPSHOT_ID).record.exists(), "the delete did not wait for the forks"
        forks.go.set()
        names: list[Any] = list(await asyncio.gather(*running))
        assert sorted(names) == [f"fork-{n}" for n in range(4)]
        await deleting
        assert not layout.snapshot(SNAPSHOT_ID).directory.exists()
        assert forks.most_inside == 4

    asyncio.run(scenario())
