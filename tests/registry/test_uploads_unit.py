"""Logic of the upload sessions (no server): Content-Range parsing and abandoned-upload sweeping."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hypemand.images.blobs import BlobStore
from hypemand.images.uploads import (
    Chunk,
    DistributionError,
    RegistryService,
    parse_content_range,
    range_header,
)
from hypemand.layout import ImageStorePaths


@pytest.mark.parametrize(("header", "expected"), [
    ("0-99", (0, 99)), ("100-199", (100, 199)), ("bytes=5-9", (5, 9)), ("bytes 5-9/100", (5, 9)),
])
def test_content_range_forms(header: str, expected: tuple[int, int]) -> None:
    assert parse_content_range(header) == expected


@pytest.mark.parametrize("header", ["", "abc", "9-5", "-5", "5-"])
def test_malformed_content_range(header: str) -> None:
    with pytest.raises(DistributionError) as info:
        parse_content_range(header)
    assert info.value.code == "BLOB_UPLOAD_INVALID"


def test_range_header() -> None:
    assert range_header(0) == "0-0"
    assert range_header(1) == "0-0"
    assert range_header(1000) == "0-999"


def _age(upload_dir: Path, seconds: float) -> None:
    """Make an upload look untouched for ``seconds``."""
    then = time.time() - seconds
    for path in [upload_dir, *upload_dir.iterdir()]:
        os.utime(path, (then, then))


def registry_service(images: Path, **options: Any) -> RegistryService:
    store = ImageStorePaths(images)
    return RegistryService(store, BlobStore(store.blobs), **options)


async def test_abandoned_uploads_are_removed_at_start(tmp_path: Path) -> None:
    """Uploads abandoned while the server was down go when the service starts; fresh ones stay."""
    images = tmp_path / "images"
    before_restart = registry_service(images, importer=None)
    old = await before_restart.start_upload("app/one")
    fresh = await before_restart.start_upload("app/two")
    _age(images / "uploads" / old.id, 25 * 3600)  # the default maximum age is 24 h

    service = registry_service(images, importer=None)
    await service.start()
    try:
        assert not (images / "uploads" / old.id).exists()
        assert (images / "uploads" / fresh.id).exists()
        with pytest.raises(DistributionError) as info:
            service.get_upload("app/one", old.id)
        assert info.value.code == "BLOB_UPLOAD_UNKNOWN"
        assert service.get_upload("app/two", fresh.id) == fresh
    finally:
        await service.stop()


async def test_abandoned_uploads_are_swept_while_running(tmp_path: Path) -> None:
    """With a short maximum age, the running service's periodic sweep removes an untouched upload,
    and a later request on it is an ordinary BLOB_UPLOAD_UNKNOWN."""
    images = tmp_path / "images"
    service = registry_service(images, importer=None,
                              upload_max_age=0.5, sweep_interval=0.1)
    await service.start()
    try:
        session = await service.start_upload("app/one")
        deadline = time.monotonic() + 10
        while (images / "uploads" / session.id).exists():
            assert time.monotonic() < deadline, "the abandoned upload was not swept"
            await asyncio.sleep(0.05)
        with pytest.raises(DistributionError) as info:
            await service.upload_status(session)
        assert info.value.code == "BLOB_UPLOAD_UNKNOWN"
    finally:
        await service.stop()


async def test_an_upload_being_written_is_not_swept(tmp_path: Path) -> None:
    """A chunk still arriving holds the upload's lock: the sweep leaves that upload alone."""
    images = tmp_path / "images"
    service = registry_service(images, importer=None, upload_max_age=60)
    session = await service.start_upload("app/one")
    _age(images / "uploads" / session.id, 3600)
    release = asyncio.Event()
    first_taken = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first"
        first_taken.set()  # the service took the first part and asks for more: it is writing
        await release.wait()
        yield b"second"

    writing = asyncio.create_task(service.append_chunk(session, Chunk(body=slow_body())))
    await first_taken.wait()
    assert await service.sweep_abandoned_uploads() == []
    release.set()
    assert await writing == len(b"firstsecond")
    assert (images / "uploads" / session.id).exists()
