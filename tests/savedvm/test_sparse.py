"""Sparse copies keep holes, content and mode; extents and allocated sizes are reported right."""

from __future__ import annotations

import errno
import filecmp
import os
import stat
from pathlib import Path

import pytest

from hypemand.savedvm import sparse
from hypemand.savedvm.errors import SparseCopyUnsupported
from hypemand.savedvm.sparse import (
    PAGE_SIZE,
    CopyMethod,
    NonZeroPages,
    allocated_bytes,
    copy_sparse,
    data_extents,
    link_or_copy,
    tree_allocated_bytes,
)
from tests.savedvm.conftest import MIB


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def assert_sparse_copy(src: Path, dst: Path) -> None:
    assert filecmp.cmp(src, dst, shallow=False)
    assert dst.stat().st_size == src.stat().st_size
    assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE(src.stat().st_mode)
    # Allocated like the source (within a few blocks), far below the logical size.
    assert allocated_bytes(dst) <= allocated_bytes(src) + 16 * PAGE_SIZE
    assert allocated_bytes(dst) < src.stat().st_size // 2


def test_data_extents_lists_written_ranges(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with path.open("wb") as handle:
        handle.truncate(8 * MIB)
        handle.seek(MIB)
        handle.write(b"x" * 3 * PAGE_SIZE)
        handle.seek(5 * MIB)
        handle.write(b"y" * PAGE_SIZE)
    assert data_extents(path) == [(MIB, 3 * PAGE_SIZE), (5 * MIB, PAGE_SIZE)]
    assert allocated_bytes(path) == 4 * PAGE_SIZE


def test_copy_sparse_keeps_holes_content_and_mode(guest_memory: Path, tmp_path: Path) -> None:
    guest_memory.chmod(0o640)
    dst = tmp_path / "copy.ram"
    method = copy_sparse(guest_memory, dst)
    assert method in (CopyMethod.SPARSE, CopyMethod.REFLINK)
    assert_sparse_copy(guest_memory, dst)
    assert data_extents(dst) == data_extents(guest_memory)
    assert leftovers(tmp_path) == []


def test_copy_sparse_replaces_an_existing_file(guest_memory: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy.ram"
    dst.write_bytes(b"old" * 100_000)
    copy_sparse(guest_memory, dst)
    assert_sparse_copy(guest_memory, dst)


def test_copy_sparse_read_write_fallback(
    guest_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = tmp_path / "copy.ram"
    assert copy_sparse(guest_memory, dst) in (CopyMethod.SPARSE, CopyMethod.REFLINK)
    assert_sparse_copy(guest_memory, dst)
    assert len(calls) <= 1  # asked once, then read/write for every extent


def test_copy_sparse_refuses_a_filesystem_without_holes(
    guest_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_lseek = os.lseek

    def no_seek_data(fd: int, offset: int, whence: int) -> int:
        if whence in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    monkeypatch.setattr(sparse, "FICLONE", 0)  # no reflink either: an invalid ioctl (ENOTTY)
    dst = tmp_path / "copy.ram"
    with pytest.raises(SparseCopyUnsupported, match="requires a sparse-capable filesystem"):
        copy_sparse(guest_memory, dst)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_copy_sparse_of_empty_and_all_hole_files(tmp_path: Path) -> None:
    empty, holes = tmp_path / "empty", tmp_path / "holes"
    empty.touch()
    with holes.open("wb") as handle:
        handle.truncate(4 * MIB)
    copy_sparse(empty, tmp_path / "empty.copy")
    copy_sparse(holes, tmp_path / "holes.copy")
    assert (tmp_path / "empty.copy").stat().st_size == 0
    assert (tmp_path / "holes.copy").stat().st_size == 4 * MIB
    assert allocated_bytes(tmp_path / "holes.copy") == 0


def test_reflink_on_xfs(xfs_mount: Path) -> None:
    from tests.savedvm.conftest import write_guest_memory

    src = write_guest_memory(xfs_mount / "memory.ram", size=16 * MIB)
    dst = xfs_mount / "clone.ram"
    assert copy_sparse(src, dst) == CopyMethod.REFLINK
    assert filecmp.cmp(src, dst, shallow=False)
    assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE(src.stat().st_mode)
    assert data_extents(dst) == data_extents(src)
    # Copy-on-write: changing the clone leaves the source alone.
    with dst.open("r+b") as handle:
        handle.write(b"changed")
    assert not filecmp.cmp(src, dst, shallow=False)


def test_copy_from_xfs_to_another_filesystem_is_sparse(xfs_mount: Path, tmp_path: Path) -> None:
    from tests.savedvm.conftest import write_guest_memory

    src = write_guest_memory(xfs_mount / "cross.ram", size=16 * MIB)
    dst = tmp_path / "cross.ram"
    assert copy_sparse(src, dst) == CopyMethod.SPARSE
    assert_sparse_copy(src, dst)


def test_link_or_copy_hardlinks_on_one_filesystem(guest_memory: Path, tmp_path: Path) -> None:
    dst = tmp_path / "linked.ram"
    dst.write_bytes(b"old")
    assert link_or_copy(guest_memory, dst) == CopyMethod.HARDLINK
    assert dst.stat().st_ino == guest_memory.stat().st_ino
    # Again, onto the same inode: rename(2) is a no-op then; no temporary name may remain.
    assert link_or_copy(guest_memory, dst) == CopyMethod.HARDLINK
    assert leftovers(tmp_path) == []


def test_link_or_copy_copies_across_filesystems(
    guest_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    dst = tmp_path / "copied.ram"
    assert link_or_copy(guest_memory, dst) in (CopyMethod.SPARSE, CopyMethod.REFLINK)
    assert dst.stat().st_ino != guest_memory.stat().st_ino
    assert_sparse_copy(guest_memory, dst)


def test_tree_allocated_bytes_counts_hard_links_once(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_bytes(b"a" * 10 * PAGE_SIZE)
    (tree / "sub" / "b").write_bytes(b"b" * 3 * PAGE_SIZE)
    os.link(tree / "a", tree / "sub" / "a-again")
    (tree / "link").symlink_to("a")
    with (tree / "holes").open("wb") as handle:
        handle.truncate(64 * MIB)
    assert tree_allocated_bytes(tree) == allocated_bytes(tree / "a") + allocated_bytes(tree / "sub" / "b")


def scan(path: Path, chunk_size: int) -> tuple[bytes, list[tuple[int, int]]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = NonZeroPages(fd, os.fstat(fd).st_size, path, chunk_size=chunk_size)
        data = b"".join(bytes(chunk) for chunk in pages)
        assert pages.data_bytes == len(data)
        return data, pages.runs
    finally:
        os.close(fd)


@pytest.mark.parametrize("chunk_size", [PAGE_SIZE, 3 * PAGE_SIZE, 8 * MIB])
def test_nonzero_pages_are_the_content_without_zero_pages(guest_memory: Path, chunk_size: int) -> None:
    content = guest_memory.read_bytes()
    expected_runs: list[tuple[int, int]] = []
    for offset in range(0, len(content), PAGE_SIZE):
        if any(content[offset : offset + PAGE_SIZE]):
            if expected_runs and sum(expected_runs[-1]) == offset:
                expected_runs[-1] = (expected_runs[-1][0], expected_runs[-1][1] + PAGE_SIZE)
            else:
                expected_runs.append((offset, PAGE_SIZE))
    data, runs = scan(guest_memory, chunk_size)
    assert runs == expected_runs
    assert data == b"".join(content[offset : offset + length] for offset, length in runs)


def test_nonzero_pages_short_last_page(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    page_with_data = b"\1" * 10 + bytes(PAGE_SIZE - 10)
    path.write_bytes(bytes(PAGE_SIZE) + page_with_data + bytes(PAGE_SIZE) + b"tail")
    data, runs = scan(path, 8 * MIB)
    assert runs == [(PAGE_SIZE, PAGE_SIZE), (3 * PAGE_SIZE, 4)]
    assert data == page_with_data + b"tail"
    path.write_bytes(page_with_data + bytes(10))  # a zero short last page is no data
    assert scan(path, 8 * MIB)[1] == [(0, PAGE_SIZE)]
