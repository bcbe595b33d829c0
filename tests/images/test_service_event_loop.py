"""ImageService keeps fsynced record writes and tree removals off the event loop (real registry)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypemand.images import registry_client
from hypemand.images.models import CreateImageRequest
from hypemand.images.service import ImageService
from hypemand.layout import DataLayout
from tests.images.conftest import PushedRegistry
from tests.support.event_loop import LoopSpy

pytestmark = pytest.mark.registry


async def test_record_writes_and_removals_run_in_worker_threads(
    tmp_path: Path, local_registry: PushedRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every one of these fsyncs (records, name pointers) or walks a whole image tree (removal):
    done on the loop under the service lock, they would stall every request meanwhile."""
    service = ImageService(DataLayout(tmp_path / "data"))
    spy = LoopSpy()

    blocking = ("write_record", "write_pointer", "remove_content", "clean_deleted")
    for name in blocking:
        monkeypatch.setattr(service.store, name, spy.wrap(name, getattr(service.store, name)))
    ref = local_registry.ref("test/single:1")
    alias = "example.com/alias/single:1"
    try:
        await service.start()
        await service.create(CreateImageRequest(name=ref))
        async with asyncio.timeout(300):
            image = await service.wait(ref)
        assert image.status == "ready", image.error
        await service.tag(ref, alias)
        await service.delete(alias)
        await service.delete(ref)  # the last name: the content goes
        assert service.store.read_record(image.digest) is None
    finally:
        await service.stop()
    assert spy.called == set(blocking)
    assert spy.on_the_loop == []


async def test_pulled_blobs_are_hashed_and_written_in_worker_threads(
    tmp_path: Path, local_registry: PushedRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 1 MiB piece of a layer is hashed and written: on the loop, a multi-MB pull would
    stall every request for as long as that takes."""
    service = ImageService(DataLayout(tmp_path / "data"))
    spy = LoopSpy()
    monkeypatch.setattr(registry_client, "write_and_hash",
                        spy.wrap("write_and_hash", registry_client.write_and_hash))
    ref = local_registry.ref("restart/img0:1")  # a 6 MiB layer: several pieces
    try:
        await service.start()
        await service.create(CreateImageRequest(name=ref))
        async with asyncio.timeout(300):
            image = await service.wait(ref)
        assert image.status == "ready", image.error
    finally:
        await service.stop()
    assert spy.called == {"write_and_hash"}
    assert spy.on_the_loop == []
