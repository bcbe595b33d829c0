"""ImageService in-process against the real registry: queue positions, joins, credentials."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from hypemand.images.errors import CredentialConflict, ImageNotReady
from hypemand.images.models import CreateImageRequest, RegistryCredentials
from hypemand.images.service import ImageService
from hypemand.layout import DataLayout
from tests.images.conftest import PushedRegistry

pytestmark = pytest.mark.registry


async def test_queue_positions_join_and_conflicting_credentials(tmp_path: Path,
                                                                local_registry: PushedRegistry) -> None:
    service = ImageService(DataLayout(tmp_path / "data"))
    first_ref, second_ref = local_registry.ref("restart/img0:1"), local_registry.ref("restart/img1:1")
    try:
        # Workers are not started yet: everything stays queued.
        first = await service.create(CreateImageRequest(name=first_ref))
        second = await service.create(CreateImageRequest(name=second_ref))
        assert (first.status, first.queue_position) == ("pending", 1)
        assert (second.status, second.queue_position) == ("pending", 2)

        joined = await service.create(CreateImageRequest(name=first_ref, tags={"who": "second-caller"}))
        assert joined.digest == first.digest and joined.queue_position == 1
        assert (await service.get(first_ref)).tags == {"who": "second-caller"}

        borrowed = RegistryCredentials.model_validate({"username": "someone", "password": "other"})
        with pytest.raises(CredentialConflict):
            await service.create(CreateImageRequest(name=first_ref, credentials=borrowed))
        with pytest.raises(ImageNotReady):
            await service.get_ready(first_ref)

        await service.start()
        async with asyncio.timeout(300):
            done = [await service.wait(first_ref), await service.wait(second_ref)]
        assert [image.status for image in done] == ["ready", "ready"], [image.error for image in done]
        ready = await service.get_ready(first_ref)
        assert ready.disk_path.is_file() and ready.disk_format == "ext4"
        assert ready.env.get("IMAGE_NUMBER") == "0" and ready.cmd == ["/bin/sh"]
        assert (await service.get_ready_by_digest(first.digest)).disk_path == ready.disk_path
    finally:
        await service.stop()


async def test_unpacked_tree_is_private_while_the_disk_is_built(
    tmp_path: Path, local_registry: PushedRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unpacked tree holds the image's setuid binaries and device nodes on the host, with the
    image's own (often world-writable) directory modes: only root may reach into it."""
    from hypemand.images import service as service_module
    from hypemand.images.disk import DiskFormat, build_disk

    seen: list[tuple[int, int, bool]] = []

    def observing_build_disk(root: Path, out: Path, fmt: DiskFormat) -> int:
        work = os.stat(root.parent)
        suid = os.lstat(root / "bin/suid")
        seen.append((stat.S_IMODE(work.st_mode), work.st_uid, bool(suid.st_mode & stat.S_ISUID)))
        return build_disk(root, out, fmt)

    monkeypatch.setattr(service_module, "build_disk", observing_build_disk)
    previous_umask = os.umask(0o022)
    service = ImageService(DataLayout(tmp_path / "data"))
    try:
        await service.start()
        ref = local_registry.ref("test/layered:1")
        await service.create(CreateImageRequest(name=ref))
        async with asyncio.timeout(300):
            image = await service.wait(ref)
        assert image.status == "ready", image.error
    finally:
        await service.stop()
        os.umask(previous_umask)
    assert seen == [(0o700, 0, True)]
