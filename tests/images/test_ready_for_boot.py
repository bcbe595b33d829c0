"""ImageService.ready_for_boot against the real registry: what an instance create waits on when a
client boots an image it has just asked for (or never asked for)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hypemand.images.errors import ImageNotFound, ImageNotReady, ImagePullFailed
from hypemand.images.models import CreateImageRequest
from hypemand.images.service import ImageService
from hypemand.layout import DataLayout
from tests.images.conftest import PushedRegistry, remove_layer_data
from tests.support.oci import Entry, busybox_entries, push

if TYPE_CHECKING:  # imported at run time, pytest would try to collect it as a test class
    from tests.images.conftest import TestImages

pytestmark = pytest.mark.registry

WAIT = 300.0  # two shared cores


async def test_an_image_being_pulled_is_waited_for(tmp_path: Path, local_registry: PushedRegistry) -> None:
    service = ImageService(DataLayout(tmp_path / "data"))
    ref = local_registry.ref("restart/img2:1")
    try:
        await service.start()
        created = await service.create(CreateImageRequest(name=ref))
        assert created.status in ("pending", "pulling")
        ready = await service.ready_for_boot(ref, WAIT)
        assert ready.digest == created.digest and ready.disk_path.is_file()
        assert ready.env.get("IMAGE_NUMBER") == "2"
        # Ready already: answered at once.
        assert (await service.ready_for_boot(ref, 0.001)).digest == created.digest
    finally:
        await service.stop()


async def test_an_unknown_image_is_pulled_first(tmp_path: Path, local_registry: PushedRegistry) -> None:
    service = ImageService(DataLayout(tmp_path / "data"))
    ref = local_registry.ref("test/layered:1")
    try:
        await service.start()
        ready = await service.ready_for_boot(ref, WAIT)
        assert ready.digest == local_registry.digests["test/layered:1"]
        image = await service.get(ref)
        assert image.status == "ready"  # an ordinary image now, listed like any other
        assert [i.name for i in await service.list_images()] == [ref]
    finally:
        await service.stop()


async def test_an_image_its_registry_does_not_have_is_not_found(
    tmp_path: Path, local_registry: PushedRegistry
) -> None:
    service = ImageService(DataLayout(tmp_path / "data"))
    ref = local_registry.ref("test/no-such-image:1")
    try:
        await service.start()
        with pytest.raises(ImageNotFound) as info:
            await service.ready_for_boot(ref, WAIT)
        message = str(info.value)
        assert ref in message and "could not be pulled" in message
        assert info.value.status == 404 and info.value.code == "not_found"
        assert await service.list_images() == []
    finally:
        await service.stop()


async def test_running_out_of_time_is_not_ready_and_the_pull_goes_on(
    tmp_path: Path, local_registry: PushedRegistry
) -> None:
    service = ImageService(DataLayout(tmp_path / "data"))
    ref = local_registry.ref("restart/img3:1")
    try:
        # No workers yet: the pull is registered but cannot progress.
        with pytest.raises(ImageNotReady) as info:
            await service.ready_for_boot(ref, 0.001)
        assert not isinstance(info.value, ImagePullFailed)
        assert info.value.status == 409 and info.value.code == "image_not_ready"
        assert "not ready after" in str(info.value)
        # The registration the timeout interrupted still completes, queued for the workers.
        async with asyncio.timeout(30):
            while True:
                try:
                    image = await service.get(ref)
                    break
                except ImageNotFound:
                    await asyncio.sleep(0.05)
        assert image.status == "pending"
        with pytest.raises(ImageNotReady, match="queued"):
            await service.ready_for_boot(ref, 0.05)
        await service.start()
        assert (await service.ready_for_boot(ref, WAIT)).digest == image.digest
    finally:
        await service.stop()


async def test_a_failed_pull_says_so_and_why(
    tmp_path: Path, local_registry: PushedRegistry, test_images: TestImages
) -> None:
    layout = test_images.layout
    layout.new_image("broken", [busybox_entries(), [Entry("junk.bin", data=os.urandom(1 << 20))]],
                     cmd=["/bin/sh"])
    push(layout, "broken", local_registry.ref("broken/app:1"))
    remove_layer_data(local_registry.registry, "broken/app", "1")
    service = ImageService(DataLayout(tmp_path / "data"))
    ref = local_registry.ref("broken/app:1")
    try:
        await service.start()
        for _ in range(2):  # while it is waited for, and once it is known to have failed
            with pytest.raises(ImagePullFailed) as info:
                await service.ready_for_boot(ref, WAIT)
            message = str(info.value)
            assert f"the pull of image {ref} failed" in message and "BLOB_UNKNOWN" in message, message
            assert info.value.status == 409 and info.value.code == "image_not_ready"
        assert (await service.get(ref)).status == "failed"
    finally:
        await service.stop()
