"""Sparse files: hole-preserving copies, extent listings, and a reader of non-zero pages.

Guest RAM (`memory.ram`, a QEMU memory-backend-file) is mostly holes: pages the guest never
touched are never allocated. Everything here keeps those holes and never reads them:

* :func:`copy_sparse` clones (reflink) or copies only the data extents; it never falls back
  to a dense copy, which would fill the disk with zeros (hypeman-behaviour §2.12).
* :class:`NonZeroPages` reads only data extents and also drops all-zero pages inside them;
  the digest and the compressor are built on it, which makes both independent of the layout
  (a hole and a written run of zeros are the same content).

Blocking; the server calls these from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

from hypemand.fsutil import fsync_dir, storage_errors
from hypemand.savedvm.errors import SparseCopyUnsupported

# linux/fs.h: _IOW(0x94, 9, int). Shares the source's blocks copy-on-write (XFS reflink, btrfs).
FICLONE = 0x40049409
PAGE_SIZE = 4096
CHUNK_SIZE = 8 << 20
# Holes shorter than this are read through (the kernel hands back zeros from memory): one big
# read is cheaper than a syscall per extent when a guest's touched pages are scattered.
READ_THROUGH_GAP = 64 << 10
# FICLONE answers these when the filesystem (or the pair of filesystems) cannot share blocks.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
# copy_file_range answers these when the kernel cannot copy between these two files.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}
# link(2) answers these when a hard link is impossible here (other filesystem, no support, limits).
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}
_ZERO_PAGE = bytes(PAGE_SIZE)


class CopyMethod(StrEnum):
    REFLINK = "reflink"  # blocks shared copy-on-write: instant, no extra space
    SPARSE = "sparse"  # data extents copied, holes kept
    HARDLINK = "hardlink"  # only from link_or_copy: the same inode under a second name


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each data extent, in order, as SEEK_DATA/SEEK_HOLE report them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _data_extents(fd, os.fstat(fd).st_size, path)
    finally:
        os.close(fd)


def _data_extents(fd: int, size: int, path: Path) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                raise SparseCopyUnsupported(
                    f"{path}: the filesystem cannot report holes (SEEK_DATA: {exc.strerror}); "
                    "copying guest files requires a sparse-capable filesystem (ext4, XFS, btrfs, tmpfs)"
                ) from None
            raise
        if start >= size:  # the file shrank under us
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        extents.append((start, end - start))
        offset = end
    return extents


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies on disk (not its logical size)."""
    return os.lstat(path).st_blocks * 512


def tree_allocated_bytes(directory: Path) -> int:
    """Allocated bytes of every regular file under ``directory``; hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def copy_sparse(src: Path, dst: Path, *, durable: bool = True) -> CopyMethod:
    """Copy ``src`` to ``dst`` keeping holes, size and mode; returns how it copied.

    A reflink is tried first; otherwise only the data extents are copied (copy_file_range,
    or read/write where the kernel refuses). The copy is written under a temporary name in
    ``dst``'s directory, fsynced and renamed, so ``dst`` is either absent/old or complete.
    ``durable=False`` leaves out the fsyncs, for a caller that must finish quickly (a paused
    guest) and calls :func:`make_durable` afterwards.
    Raises :class:`SparseCopyUnsupported` when the filesystem cannot report holes, and
    :class:`InsufficientStorage` when it is full (nothing is left under ``dst``'s name).
    """
    with storage_errors(f"a copy of {src.name}"):
        return _copy_sparse(src, dst, durable)


def _copy_sparse(src: Path, dst: Path, durable: bool) -> CopyMethod:
    src_fd = os.open(src, os.O_RDONLY)
    try:
        src_stat = os.fstat(src_fd)
        tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        try:
            method = _clone_or_copy(src_fd, tmp_fd, src_stat.st_size, src)
            os.fchmod(tmp_fd, stat.S_IMODE(src_stat.st_mode))
            if durable:
                os.fsync(tmp_fd)
            os.close(tmp_fd)
            tmp_fd = -1
            os.replace(tmp_name, dst)
        except BaseException:
            if tmp_fd >= 0:
                os.close(tmp_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
    finally:
        os.close(src_fd)
    if durable:
        fsync_dir(dst.parent)
    return method


def make_durable(directory: Path) -> None:
    """fsync every regular file in ``directory``, then the directory itself."""
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def _clone_or_copy(src_fd: int, dst_fd: int, size: int, src: Path) -> CopyMethod:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return CopyMethod.REFLINK
    except OSError as exc:
        if exc.errno not in _NO_REFLINK:
            raise
    extents = _data_extents(src_fd, size, src)
    os.ftruncate(dst_fd, size)  # the size, and every byte not copied below, is a hole
    copier = _ExtentCopier(src_fd, dst_fd, src)
    for offset, length in extents:
        copier.copy(offset, length)
    return CopyMethod.SPARSE


class _ExtentCopier:
    """Copies byte ranges at the same offset; copy_file_range while the kernel allows it."""

    def __init__(self, src_fd: int, dst_fd: int, src: Path) -> None:
        self.src_fd, self.dst_fd, self.src = src_fd, dst_fd, src
        self.use_copy_file_range = True
        self._buffer: bytearray | None = None

    def copy(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            if self.use_copy_file_range:
                try:
                    copied = os.copy_file_range(
                        self.src_fd, self.dst_fd, min(end - offset, 1 << 30), offset, offset
                    )
                except OSError as exc:
                    if exc.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    # The answer will not change for this pair of files: stop asking.
                    self.use_copy_file_range = False
                    continue
            else:
                copied = self._read_write(offset, min(end - offset, CHUNK_SIZE))
            if copied == 0:
                raise OSError(errno.EIO, f"{self.src} shrank while it was being copied")
            offset += copied

    def _read_write(self, offset: int, length: int) -> int:
        if self._buffer is None:
            self._buffer = bytearray(CHUNK_SIZE)
        view = memoryview(self._buffer)[:length]
        got = os.preadv(self.src_fd, [view], offset)
        written = 0
        while written < got:
            written += os.pwrite(self.dst_fd, view[written:got], offset + written)
        return got


def link_or_copy(src: Path, dst: Path) -> CopyMethod:
    """Hard-link ``src`` as ``dst`` when both are on one filesystem, else :func:`copy_sparse`.

    A hard link shares the inode: only use it for files nobody writes in place any more.
    Replaces an existing ``dst`` atomically.
    """
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno in _NO_HARDLINK:
            return copy_sparse(src, dst)
        raise
    try:
        os.replace(tmp, dst)
    finally:
        # rename(2) does nothing when both names are already links to the same inode.
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return CopyMethod.HARDLINK


class NonZeroPages:
    """The non-zero 4 KiB pages of a file, read in file order; holes are never read.

    Iterating yields the concatenated bytes of the non-zero pages, one chunk (at most
    ``chunk_size``) at a time, as a view into a reused buffer that is only valid until the
    next step. After the iteration, :attr:`runs` holds the (offset, length) of the maximal
    runs of non-zero pages and :attr:`data_bytes` their total length. Both depend only on
    the content, not on which zeros are holes and which are written (a short last page
    counts as a page).
    """

    def __init__(self, fd: int, size: int, path: Path, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size % PAGE_SIZE:
            raise ValueError("chunk_size must be a multiple of the page size")
        self.fd, self.size, self.path, self.chunk_size = fd, size, path, chunk_size
        self.runs: list[tuple[int, int]] = []
        self.data_bytes = 0

    def __iter__(self) -> Iterator[memoryview]:
        self.runs, self.data_bytes = [], 0
        # No bigger than the file: a 70 KB device-state file must not pay for two 8 MiB buffers.
        buffer_size = min(self.chunk_size, -(-max(self.size, 1) // PAGE_SIZE) * PAGE_SIZE)
        read_buffer = bytearray(buffer_size)
        read_view = memoryview(read_buffer)
        packed_view = memoryview(bytearray(buffer_size))
        for offset, length in self._reads():
            got = os.preadv(self.fd, [read_view[:length]], offset)
            if got != length:
                raise OSError(errno.EIO, f"{self.path} shrank while it was being read")
            segments = self._nonzero_segments(read_buffer, length)
            for start, end in segments:
                self._add_run(offset + start, end - start)
            if len(segments) == 1 and segments[0] == (0, length):
                yield read_view[:length]
            elif segments:
                packed = 0
                for start, end in segments:
                    packed_view[packed : packed + end - start] = read_view[start:end]
                    packed += end - start
                yield packed_view[:packed]

    def _reads(self) -> Iterator[tuple[int, int]]:
        """Page-aligned (offset, length) reads covering every data extent, nearby ones merged."""
        spans: list[list[int]] = []
        for offset, length in _data_extents(self.fd, self.size, self.path):
            start = offset - offset % PAGE_SIZE
            end = min(-(-(offset + length) // PAGE_SIZE) * PAGE_SIZE, self.size)
            if spans and start - spans[-1][1] < READ_THROUGH_GAP:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        for start, end in spans:
            for offset in range(start, end, self.chunk_size):
                yield offset, min(self.chunk_size, end - offset)

    @staticmethod
    def _nonzero_segments(buffer: bytearray, length: int) -> list[tuple[int, int]]:
        """(start, end) of the runs of non-zero pages in ``buffer[:length]``."""
        segments: list[tuple[int, int]] = []
        run_start = -1
        whole_pages = length - length % PAGE_SIZE
        for page in range(0, whole_pages, PAGE_SIZE):
            # A first or last byte that is set settles it without comparing the page.
            if buffer[page] or buffer[page + PAGE_SIZE - 1] or buffer[page : page + PAGE_SIZE] != _ZERO_PAGE:
                if run_start < 0:
                    run_start = page
            elif run_start >= 0:
                segments.append((run_start, page))
                run_start = -1
        if whole_pages < length:  # the short last page of a file
            if buffer[whole_pages:length] != _ZERO_PAGE[: length - whole_pages]:
                if run_start < 0:
                    run_start = whole_pages
            elif run_start >= 0:
                segments.append((run_start, whole_pages))
                run_start = -1
        if run_start >= 0:
            segments.append((run_start, length))
        return segments

    def _add_run(self, offset: int, length: int) -> None:
        self.data_bytes += length
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == offset:
            self.runs[-1] = (self.runs[-1][0], self.runs[-1][1] + length)
        else:
            self.runs.append((offset, length))
