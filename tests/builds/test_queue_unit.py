"""The build queue and a run's end under cancellation, without VMs: the real service and builder
service on a temporary data directory, with the run's VM part replaced (the VM tests in
``test_builds_vm.py`` drive the whole path; these pin the races a review found)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hypemand.aiotools import run_to_completion
from hypemand.builds import builders as builders_module
from hypemand.builds import runner as runner_module
from hypemand.builds.builders import BuilderService
from hypemand.builds.models import BuildRecord, BuildSpec, BuildStatus, CreateBuilderRequest
from hypemand.builds.runner import LineTail
from hypemand.builds.service import BuildService, BuildSettings
from hypemand.layout import DataLayout


def service(tmp_path: Path, builders: BuilderService | None = None) -> BuildService:
    layout = DataLayout(tmp_path)
    return BuildService(layout, images=None, instances=None, volumes=None,  # type: ignore[arg-type]
                        builders=builders or BuilderService(layout), settings=BuildSettings(max_concurrent=1),
                        system_dir=tmp_path)


def queue(svc: BuildService, build_id: str, **spec: Any) -> None:
    svc.layout.build(build_id).directory.mkdir(parents=True)
    svc._records[build_id] = BuildRecord(id=build_id, status=BuildStatus.QUEUED, created_at=datetime.now(UTC),
                                         spec=BuildSpec(**spec))
    svc._queue.append(build_id)


def instant_runs(svc: BuildService) -> list[str]:
    ran: list[str] = []

    async def run_build(record: BuildRecord) -> None:
        ran.append(record.id)
        await svc._finish(record.id, BuildStatus.READY)

    svc._run_build = run_build  # type: ignore[method-assign]
    return ran


async def settled(svc: BuildService) -> None:
    while svc._running:
        await asyncio.gather(*svc._running.values(), return_exceptions=True)


async def test_a_cancel_before_the_run_takes_a_step_ends_it_and_frees_the_queue(tmp_path: Path) -> None:
    svc = service(tmp_path)
    ran = instant_runs(svc)
    queue(svc, "a")
    queue(svc, "b")
    svc._dispatch()  # "a" has a task that has not run yet
    await svc.cancel("a")  # a DELETE in the same step of the loop
    await settled(svc)
    assert svc._records["a"].status is BuildStatus.CANCELLED
    assert ran == ["b"] and svc._records["b"].status is BuildStatus.READY


async def test_a_build_queued_while_its_builder_is_pruned_starts_after_the_prune(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builders = BuilderService(DataLayout(tmp_path))
    svc = service(tmp_path, builders)
    ran = instant_runs(svc)
    await builders.create(CreateBuilderRequest(id="x", disk_size_gb=1))
    remake = builders_module._remake_cache
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_remake(paths: Any, record: Any) -> None:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.3)
        remake(paths, record)

    monkeypatch.setattr(builders_module, "_remake_cache", slow_remake)
    prune = asyncio.create_task(builders.prune("x"))
    await started.wait()  # the prune holds the builder
    queue(svc, "a", builder_id="x")
    svc._dispatch()
    assert ran == []
    await prune
    await settled(svc)
    assert ran == ["a"]


class SlowSyncAgent:
    def __init__(self) -> None:
        self.executing = asyncio.Event()
        self.syncing = asyncio.Event()

    async def exec(self, *args: Any, **kwargs: Any) -> Any:
        self.executing.set()
        await asyncio.Event().wait()  # a RUN that never ends

    async def run(self, *args: Any, **kwargs: Any) -> Any:
        self.syncing.set()
        await asyncio.sleep(0.5)  # a busy guest's sync


class RecordingHost(runner_module.RunnerHost):
    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.guest = SlowSyncAgent()

    async def create_vm(self, request: Any) -> str:
        return "vm1"

    async def agent(self, instance_id: str, wait: float) -> Any:
        return self.guest

    async def delete_vm(self, instance_id: str) -> None:
        self.deleted.append(instance_id)


class NoVolumes:
    def grant(self, *args: Any) -> None: ...

    def revoke(self, *args: Any) -> None: ...


async def test_a_second_cancel_while_the_vm_is_flushed_still_ends_the_vm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "build_ext4", lambda *args: None)
    host = RecordingHost()
    runner = runner_module.BuildRunner(host, NoVolumes())  # type: ignore[arg-type]
    record = BuildRecord(id="b1", status=BuildStatus.BUILDING, created_at=datetime.now(UTC), spec=BuildSpec())
    job = runner_module.BuildJob(
        record=record, paths=DataLayout(tmp_path).build("b1"), cache_disk=tmp_path / "c", builder_image="img",
        cache_ref="build:cache:builder:x", persistent_cache=True, base_layers=set(), pull=[])

    async def sink(data: bytes) -> None: ...

    async def on_vm(instance_id: str) -> None: ...

    task = asyncio.create_task(runner.build(job, sink, on_vm))
    await host.guest.executing.wait()
    task.cancel()  # the build's DELETE: the VM is flushed, then ended
    await host.guest.syncing.wait()
    task.cancel()  # a second DELETE (or the timeout) during the flush
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert host.deleted == ["vm1"]  # gone before the cancel returned


async def test_run_to_completion_outlasts_repeated_cancels_then_raises() -> None:
    finished: list[str] = []

    async def work() -> str:
        await asyncio.sleep(0.2)
        finished.append("done")
        return "result"

    task = asyncio.create_task(run_to_completion(work()))
    for _ in range(3):
        await asyncio.sleep(0.02)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == ["done"]
    assert await run_to_completion(work()) == "result"


def test_an_endless_line_costs_no_more_than_its_width() -> None:
    tail = LineTail(3, width=10)
    for _ in range(200):  # 12.5 MiB without a newline: kept is one line's width
        tail.feed(b"x" * 65536)
        assert len(tail.partial) <= 10
    tail.feed(b"\nlast line\n")
    assert tail.text() == "x" * 10 + "\nlast line"
