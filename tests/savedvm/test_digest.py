"""The content digest: any change of data or size is caught; the hole layout is not content."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hypemand.errors import DomainError
from hypemand.savedvm.digest import file_digest, verify_file
from hypemand.savedvm.errors import SavedVMCorrupt
from hypemand.savedvm.sparse import PAGE_SIZE, copy_sparse, data_extents
from tests.savedvm.conftest import MIB


def test_digest_format_and_stability(guest_memory: Path) -> None:
    digest = file_digest(guest_memory)
    assert re.fullmatch(r"xxh3-128:[0-9a-f]{32}", digest)
    assert file_digest(guest_memory) == digest
    verify_file(guest_memory, digest)
    verify_file(guest_memory, digest, expected_size=guest_memory.stat().st_size)


def test_one_changed_byte_is_detected(guest_memory: Path) -> None:
    digest = file_digest(guest_memory)
    offset, length = data_extents(guest_memory)[len(data_extents(guest_memory)) // 2]
    position = offset + length // 2
    with guest_memory.open("r+b") as handle:
        handle.seek(position)
        old = handle.read(1)
        handle.seek(position)
        handle.write(bytes([old[0] ^ 1]))
    assert file_digest(guest_memory) != digest
    with pytest.raises(SavedVMCorrupt, match=f"{guest_memory}: content differs") as caught:
        verify_file(guest_memory, digest)
    assert isinstance(caught.value, DomainError)
    assert (caught.value.status, caught.value.code) == (409, "snapshot_corrupt")


def test_a_byte_written_into_a_hole_is_detected(guest_memory: Path) -> None:
    digest = file_digest(guest_memory)
    with guest_memory.open("r+b") as handle:
        handle.seek(guest_memory.stat().st_size - 100)  # the tail is a hole
        handle.write(b"\1")
    assert file_digest(guest_memory) != digest


@pytest.mark.parametrize("change", [-PAGE_SIZE, -1, 1, MIB])
def test_truncation_and_extension_are_detected(guest_memory: Path, change: int) -> None:
    digest = file_digest(guest_memory)
    size = guest_memory.stat().st_size
    os.truncate(guest_memory, size + change)  # only holes cut off or added: the size tells
    assert file_digest(guest_memory) != digest
    with pytest.raises(SavedVMCorrupt, match=f"size is {size + change} bytes, {size} were recorded"):
        verify_file(guest_memory, digest, expected_size=size)
    with pytest.raises(SavedVMCorrupt, match="content differs"):
        verify_file(guest_memory, digest)


def test_holes_and_written_zeros_digest_alike(tmp_path: Path) -> None:
    data = os.urandom(3 * PAGE_SIZE)
    with_holes, with_zeros = tmp_path / "holes", tmp_path / "zeros"
    with with_holes.open("wb") as handle:
        handle.truncate(4 * MIB)
        handle.seek(MIB)
        handle.write(data)
    with_zeros.write_bytes(bytes(MIB) + data + bytes(3 * MIB - len(data)))
    assert data_extents(with_holes) != data_extents(with_zeros)
    assert file_digest(with_holes) == file_digest(with_zeros)


def test_zero_pages_inside_data_do_not_count(tmp_path: Path) -> None:
    page = os.urandom(PAGE_SIZE)
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    dense.write_bytes(page + bytes(2 * PAGE_SIZE) + page)
    with sparse.open("wb") as handle:
        handle.write(page)
        handle.seek(3 * PAGE_SIZE)
        handle.write(page)
    assert file_digest(dense) == file_digest(sparse)
    # The same pages in another place are other content.
    moved = tmp_path / "moved"
    moved.write_bytes(page + bytes(PAGE_SIZE) + page + bytes(PAGE_SIZE))
    assert file_digest(moved) != file_digest(dense)


def test_a_copy_has_the_same_digest(guest_memory: Path, tmp_path: Path) -> None:
    copy_sparse(guest_memory, tmp_path / "copy.ram")
    assert file_digest(tmp_path / "copy.ram") == file_digest(guest_memory)


def test_missing_file_and_foreign_digest(tmp_path: Path) -> None:
    with pytest.raises(SavedVMCorrupt, match="missing"):
        verify_file(tmp_path / "nope", "xxh3-128:" + "0" * 32)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(SavedVMCorrupt, match="not an xxh3-128 digest"):
        verify_file(tmp_path / "f", "sha256:abc")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    (tmp_path / "zeros").write_bytes(bytes(10))
    assert file_digest(tmp_path / "empty") != file_digest(tmp_path / "zeros")
