"""Pure logic of the upload sessions (no server): Content-Range parsing and stale-upload cleanup."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hypemand.images.blobs import BlobStore
from hypemand.images.uploads import RegistryError, RegistryService, parse_content_range, range_header


@pytest.mark.parametrize(("header", "expected"), [
    ("0-99", (0, 99)), ("100-199", (100, 199)), ("bytes=5-9", (5, 9)), ("bytes 5-9/100", (5, 9)),
])
def test_content_range_forms(header: str, expected: tuple[int, int]) -> None:
    assert parse_content_range(header) == expected


@pytest.mark.parametrize("header", ["", "abc", "9-5", "-5", "5-"])
def test_malformed_content_range(header: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_content_range(header)
    assert info.value.code == "BLOB_UPLOAD_INVALID"


def test_range_header() -> None:
    assert range_header(0) == "0-0"
    assert range_header(1) == "0-0"
    assert range_header(1000) == "0-999"


def test_abandoned_uploads_are_removed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    service = RegistryService(images, BlobStore(images / "blobs"), importer=None)
    old = service.start_upload("app/one")
    long_ago = time.time() - 3 * 24 * 3600
    for path in [images / "uploads" / old.id, *(images / "uploads" / old.id).iterdir()]:
        os.utime(path, (long_ago, long_ago))
    fresh = service.start_upload("app/two")  # starting an upload sweeps abandoned ones
    assert not (images / "uploads" / old.id).exists()
    assert (images / "uploads" / fresh.id).exists()
    with pytest.raises(RegistryError) as info:
        service.get_upload("app/one", old.id)
    assert info.value.code == "BLOB_UPLOAD_UNKNOWN"
    assert service.get_upload("app/two", fresh.id) == fresh
