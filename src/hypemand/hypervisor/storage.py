"""Host disk space a VMM depends on: reserving guest RAM files, and naming a full filesystem.

Guest RAM is a shared file mapping (``memory.ram``). Left sparse, every page the guest touches
for the first time needs a new block of the host filesystem, and when there is none the kernel
answers the page fault with SIGBUS: QEMU dies. So the blocks are reserved before QEMU maps the
file, with ``fallocate`` mode 0. That allocates *unwritten* extents: they read as zeros, and
``SEEK_DATA`` reports them as holes (verified on ext4 and tmpfs, see the README), so sparse
copies and digests of the file stay as cheap as before; only the space is taken.

A fork maps its (shared, hard-linked) RAM file with ``share=off``: the guest's writes go to
private anonymous memory and never to the file, so a fork needs no reservation.

Blocking; async code calls these in a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

from hypemand.errors import InsufficientStorage
from hypemand.fsutil import is_no_space

log = logging.getLogger(__name__)

MIB = 1 << 20
# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself. Not ``os.posix_fallocate``: where the filesystem cannot allocate,
    glibc emulates that by writing every block, which would turn the RAM file's holes into data."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def free_bytes(path: Path) -> int:
    """Space available to unprivileged writers on ``path``'s filesystem (what ``df`` shows).
    The root-only reserve is left alone: it keeps room for the records written when a VM ends."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def no_space(what: str, directory: Path, needed: int | None = None) -> InsufficientStorage:
    """The error for ``what`` not fitting on ``directory``'s filesystem, naming need and free."""
    try:
        free = f"{free_bytes(directory) // MIB} MiB free"
    except OSError:
        free = "free space unknown"
    need = f" needs {-(-needed // MIB)} MiB," if needed is not None else ""  # rounded up
    return InsufficientStorage(f"{what}{need} {free} on the filesystem of {directory}")


def reserve_memory_file(path: Path, size: int, *, fresh: bool) -> None:
    """Allocate all ``size`` bytes of the guest RAM file ``path`` so that QEMU's mapping of it can
    never fault for lack of space.

    ``fresh``: create the file (it must not exist); on failure it is removed. Otherwise the file
    is a saved VM's RAM: its content is kept, and on failure the blocks this call took are given
    back. Raises ``InsufficientStorage`` naming what was needed and what is free. A filesystem
    that cannot reserve (EOPNOTSUPP) is logged and the file left sparse.
    """
    what = f"reserving the guest RAM file {path.name} ({size // MIB} MiB)"
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if fresh else 0)
    fd = os.open(path, flags, 0o600)
    try:
        needed = max(0, size - os.fstat(fd).st_blocks * 512)
        if needed > free_bytes(path.parent):
            raise no_space(what, path.parent, needed)
        if needed == 0:
            return  # reserved by an earlier boot or restore (unwritten extents survive a standby)
        written = [] if fresh else _data_ranges(fd)
        try:
            _fallocate(fd, 0, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: the filesystem cannot reserve the guest RAM; it stays sparse "
                            "(a full disk will kill this VM)", path)
                os.ftruncate(fd, max(size, os.fstat(fd).st_size))
                return
            if not is_no_space(exc):
                raise
            if not fresh:
                _deallocate_outside(fd, written)
            raise no_space(what, path.parent, needed) from None
    except BaseException:
        if fresh:
            path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _data_ranges(fd: int) -> list[tuple[int, int]]:
    """(start, end) of each range SEEK_DATA reports: everything else reads as zeros."""
    size = os.fstat(fd).st_size
    ranges = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, end))
        offset = end
    return ranges


def _deallocate_outside(fd: int, written: list[tuple[int, int]]) -> None:
    """Punch out every block outside ``written`` (the data ranges before a failed reservation).
    Those ranges read as zeros before and after (a half-done fallocate leaves unwritten extents,
    and ext4 may even write zeros into some when it cannot split an extent), so the content is
    unchanged and the space the attempt took is given back. Best effort: punching can need
    space too."""
    size = os.fstat(fd).st_size
    gaps, offset = [], 0
    for start, end in [*written, (size, size)]:
        if start > offset:
            gaps.append((offset, start))
        offset = max(offset, end)
    try:
        for start, end in gaps:
            _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start)
    except OSError as exc:
        log.warning("giving back a failed RAM reservation: %s", exc)
