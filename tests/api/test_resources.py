"""``GET /resources`` while instances come and go.

The route answers from the manager's live instances, which the event loop changes as instances
are created and deleted, and from the file system (sizes, statvfs), which is blocking work for a
worker thread. The live instances must be read on the loop and only the file system work be left
to the thread: a thread iterating the live instances meets "dictionary changed size during
iteration" as soon as a create or delete lands meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypeman import Hypeman

from hypemand.api import system
from hypemand.images import demo
from hypemand.instances import resources as resources_module
from hypemand.instances.admission import DiskClaim
from hypemand.instances.host import host_capacity
from hypemand.instances.live import InstanceTable
from hypemand.instances.networking import Networking
from hypemand.layout import DataLayout
from tests.api.conftest import SMALL
from tests.support.event_loop import LoopSpy
from tests.support.harness import ServerProcess, strict_client

# Threads that create and delete, creates (then deletes) each, /resources readers, and instances
# running throughout: as many as admission lets run at once (4 vCPUs per host CPU, 1 each).
CHURNERS, CREATES, READERS = 3, 8, 8
STANDING = min(5, 4 * (os.cpu_count() or 1) - CHURNERS)
QUIET: dict[str, Any] = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 3600; done"],
                         "skip_guest_agent": True, **SMALL}


# ---- the route, on a manager whose instances the event loop keeps changing -------------------------


class ChangingManager:
    """Enough of an InstanceManager for the route: live instances in a dict, read the way the
    manager reads them, each entry a moment's work that lets other threads run (as the pidfd poll
    of a real entry does)."""

    def __init__(self, root: Path, spy: LoopSpy) -> None:
        self.layout = DataLayout(root)
        self.live: dict[str, SimpleNamespace] = {}
        self.allocations = spy.wrap("allocations", self._allocations)
        self.capacity = spy.wrap("capacity", lambda: host_capacity(root))
        self.hypervisor = SimpleNamespace(writes_memory_file=lambda directory: True)
        self.network = Networking(InstanceTable(), None, None, "no network in this test")

    def _allocations(self) -> list[tuple[Any, bool, DiskClaim]]:
        found = []
        for record in self.live.values():
            time.sleep(0.0005)  # the GIL is free here, as in a real entry's liveness poll
            paths = self.layout.instance(record.id)
            claim = DiskClaim(overlay=paths.overlay_disk, overlay_bytes=record.overlay_bytes,
                              memory_file=paths.memory_file, memory_bytes=record.memory_bytes,
                              standby_record=paths.standby_record)
            found.append((record, True, claim))
        return found

    def add(self, number: int) -> None:
        self.live[f"i{number}"] = SimpleNamespace(id=f"i{number}", name=f"n{number}", vcpus=1,
                                                  memory_bytes=1 << 28, hotplug_bytes=0,
                                                  overlay_bytes=1 << 26, bandwidth_download=None,
                                                  bandwidth_upload=None)


async def test_resources_reads_the_live_instances_on_the_loop_and_the_disk_off_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = LoopSpy()
    for name in ("sparse_size", "_tree_size"):
        monkeypatch.setattr(resources_module, name, spy.wrap(name, getattr(resources_module, name)))
    manager = ChangingManager(tmp_path, spy)
    for number in range(20):
        manager.add(number)
    request: Any = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        runtime=SimpleNamespace(instances=manager))))
    stop = asyncio.Event()

    async def churn() -> None:  # what creates and deletes do to the manager, on the loop
        number = 20
        while not stop.is_set():
            manager.add(number)
            await asyncio.sleep(0)
            manager.live.pop(f"i{number - 20}", None)
            number += 1
            await asyncio.sleep(0)

    churner = asyncio.create_task(churn())
    try:
        answers = [await system.get_resources(request) for _ in range(30)]
    finally:
        stop.set()
        await churner
    assert all(len(answer.allocations) in (20, 21) for answer in answers)
    assert all(answer.cpu.allocated == len(answer.allocations) for answer in answers)
    # The live instances were read on the loop; statvfs and the sizes were measured off it.
    assert "allocations" in spy.on_the_loop
    assert spy.called >= {"capacity", "sparse_size", "_tree_size"}
    assert not {"capacity", "sparse_size", "_tree_size"} & set(spy.on_the_loop)


# ---- the real server, with instances created and deleted meanwhile --------------------------------------


@pytest.mark.vm
def test_resources_answers_while_instances_are_created_and_deleted(api: ServerProcess, sdk: Hypeman) -> None:
    """Readers ask for /resources without a pause while threads create and delete instances (a
    create adds a live instance once its VMM runs, a delete removes it) and others run throughout.
    Every answer is a 200 that matches the contract, and its allocations are instances of this
    server, each once. (Before the fix, this failed on every one of six runs.)"""
    standing = [sdk.instances.create(name=f"res-standing-{n}", image=demo.DEMO_NAME, **QUIET)
                for n in range(STANDING)]
    done = threading.Event()
    errors: list[BaseException] = []
    answers = 0
    lock = threading.Lock()

    def churn(worker: int) -> None:
        with strict_client(api) as client:
            for n in range(CREATES):
                instance = client.instances.create(name=f"res-churn-{worker}-{n}", image=demo.DEMO_NAME,
                                                   **QUIET)
                client.instances.delete(instance.id)

    def read() -> None:
        nonlocal answers
        with strict_client(api) as client:
            while not done.is_set():
                try:
                    answer = client.resources.get()
                except Exception as exc:
                    errors.append(exc)
                    return
                ids = [allocation.instance_id for allocation in answer.allocations]
                assert len(ids) == len(set(ids)), ids
                with lock:
                    answers += 1

    try:
        with ThreadPoolExecutor(READERS + CHURNERS) as pool:
            readers = [pool.submit(read) for _ in range(READERS)]
            churners = [pool.submit(churn, worker) for worker in range(CHURNERS)]
            try:
                for future in churners:
                    future.result()
            finally:
                done.set()
            for future in readers:
                future.result()
    finally:
        for instance in standing:
            sdk.instances.delete(instance.id)
    assert not errors, errors
    assert answers > CHURNERS * CREATES, f"only {answers} answers while instances came and went"
    assert {a.instance_id for a in sdk.resources.get().allocations} == {i.id for i in sdk.instances.list()}
