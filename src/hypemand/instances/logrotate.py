"""Capping an instance's logs: a log above the size limit has its head cut off and kept as
``<log>.1`` (older copies move up to ``.2`` ... ``.<max_files>``; the oldest is dropped).

Every instance log is appended to by a writer that keeps it open: QEMU holds the console
(``app.log``, ``append=on``) and its own ``vmm.log`` for as long as the VM runs; the server
appends to ``hypeman.log``. Renaming the file would leave QEMU writing into the copy, so the head
is cut in place:

1. The head, everything but the file's last partial block, is copied to ``<log>.1.partial``
   (bytes before the end of an append-only file never change, so no lock is needed yet).
2. Under the file's lock in the :class:`RotationLedger` (readers wait for a moment), the older
   copies move up, the partial copy becomes ``<log>.1``, and ``FALLOC_FL_COLLAPSE_RANGE`` removes
   the head from the file. The kernel does that atomically with the writer's appends: nothing
   is lost, and the next append lands at the new end. The ledger records the bytes cut, by which
   readers holding an offset (``logtail.LogFollower``) find their place again.
3. A file system that cannot collapse (tmpfs, for one) gets the classic copy-then-truncate
   instead: the rest of the file is copied and the file truncated to 0. What the writer appends
   between that last copy and the truncation (microseconds) is lost; there is no better way
   while another process holds the file open.

The console has readers with an offset of their own: the instance's :class:`ConsoleScanner` and
the record's ``console_offset`` (where this boot began). For it the rotator also holds the
instance's lock (no boot or restore is noting its console offset meanwhile; an instance in the
middle of an operation is left for the next pass) and the scanner, which scans to the end
before the cut, so no marker of the running boot is lost; then both offsets move down by the
bytes cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hypemand.instances import records
from hypemand.instances.live import LiveInstance
from hypemand.instances.logtail import ROTATIONS, RotationLedger, rotated_name
from hypemand.layout import rotation_partial

log = logging.getLogger(__name__)

FALLOC_FL_COLLAPSE_RANGE = 0x08  # linux/falloc.h
_COPY_STEP = 8 << 20
# What a file system without collapse (or a cut it refuses) answers; anything else is an error.
_CANNOT_COLLAPSE = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    fallocate = ctypes.CDLL(library, use_errno=True).fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _load_fallocate()


def collapse_head(fd: int, length: int) -> bool:
    """Remove the first ``length`` bytes of a file (a multiple of its block size, short of its
    end); False if its file system cannot."""
    if _fallocate is None:
        return False
    if _fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in _CANNOT_COLLAPSE:
        return False
    raise OSError(error, os.strerror(error))


def _copy(source: int, target: int, start: int, length: int | None) -> int:
    """Copy ``length`` bytes (None: to the end) of ``source`` from ``start`` to the current
    position of ``target``; returns the bytes copied."""
    copied = 0
    while length is None or copied < length:
        step = _COPY_STEP if length is None else min(_COPY_STEP, length - copied)
        chunk = os.pread(source, step, start + copied)
        if not chunk:
            break
        os.write(target, chunk)
        copied += len(chunk)
    return copied


@dataclass(frozen=True)
class Rotation:
    path: Path
    removed: int  # bytes cut from the head of ``path``
    copy: Path  # where they are now: <log>.1


class PreparedRotation:
    """A log's head already copied aside (step 1), ready to be cut."""

    def __init__(self, path: Path, log_file: BinaryIO, partial: Path, copy_file: BinaryIO) -> None:
        self.path = path
        self.log_file = log_file
        self.partial = partial
        self.copy_file = copy_file
        self.cut = 0

    def commit(self, max_files: int, ledger: RotationLedger) -> Rotation:
        """Steps 2 or 3: make the copy ``<log>.1`` and cut the file. Blocking."""
        log_fd, copy_fd = self.log_file.fileno(), self.copy_file.fileno()
        newest = rotated_name(self.path, 1)
        with ledger.lock(self.path):
            _shift_copies(self.path, max_files)
            os.replace(self.partial, newest)
            if self.cut and collapse_head(log_fd, self.cut):
                removed = self.cut
            else:
                removed = self.cut + _copy(log_fd, copy_fd, self.cut, None)
                os.ftruncate(log_fd, 0)
            ledger.record(self.path, removed)
        return Rotation(self.path, removed, newest)

    def close(self) -> None:
        """Blocking; removes the copy if it was not committed."""
        self.copy_file.close()
        self.log_file.close()
        self.partial.unlink(missing_ok=True)


def prepare_rotation(path: Path) -> PreparedRotation | None:
    """Step 1. Blocking. None if the log is gone."""
    try:
        log_file = open(path, "r+b", buffering=0)  # noqa: SIM115 - owned by the result
    except FileNotFoundError:
        return None
    partial = rotation_partial(path)
    try:
        copy_file = open(partial, "wb", buffering=0)  # noqa: SIM115 - owned by the result
    except BaseException:
        log_file.close()
        raise
    prepared = PreparedRotation(path, log_file, partial, copy_file)
    try:
        fd = log_file.fileno()
        size = os.fstat(fd).st_size
        block = os.fstatvfs(fd).f_bsize
        # Whole blocks only, and never up to the end: what a collapse can remove.
        prepared.cut = (size - 1) // block * block if size else 0
        _copy(fd, copy_file.fileno(), 0, prepared.cut)
    except BaseException:
        prepared.close()
        raise
    return prepared


def rotate_file(path: Path, max_files: int, ledger: RotationLedger = ROTATIONS) -> Rotation | None:
    """Rotate one log (blocking); None if it is gone."""
    prepared = prepare_rotation(path)
    if prepared is None:
        return None
    try:
        return prepared.commit(max_files, ledger)
    finally:
        prepared.close()


def _shift_copies(path: Path, max_files: int) -> None:
    rotated_name(path, max_files).unlink(missing_ok=True)
    for number in range(max_files - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(rotated_name(path, number), rotated_name(path, number + 1))


def instance_logs(live: LiveInstance) -> tuple[Path, Path, Path]:
    return live.paths.console_log, live.paths.vmm_log, live.paths.operations_log


def _sizes(paths: list[Path]) -> dict[Path, int]:
    sizes = {}
    for path in paths:
        try:
            sizes[path] = os.stat(path).st_size
        except FileNotFoundError:
            sizes[path] = 0
    return sizes


class LogRotator:
    """Every ``interval`` seconds, one stat per instance log; each above ``max_size`` is rotated,
    ``max_files`` copies kept. ``instances`` is called at each pass for the instances to look at."""

    def __init__(
        self,
        instances: Callable[[], Iterable[LiveInstance]],
        *,
        max_size: int,
        max_files: int,
        interval: float,
        ledger: RotationLedger = ROTATIONS,
    ) -> None:
        if max_files < 1:
            raise ValueError("max_files must be at least 1: the console is read from the copy")
        self.instances = instances
        self.max_size = max_size
        self.max_files = max_files
        self.interval = interval
        self.ledger = ledger
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-rotation")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.rotate_due()
            except Exception:
                log.exception("log rotation pass failed")  # and the next pass tries again

    async def rotate_due(self) -> list[Rotation]:
        """One pass: rotate what is over the limit now."""
        present = [live for live in self.instances() if not live.deleted]
        self.ledger.retain(path for live in present for path in instance_logs(live))
        sizes = await asyncio.to_thread(_sizes, [path for live in present for path in instance_logs(live)])
        done: list[Rotation] = []
        for live in present:
            due = [path for path in instance_logs(live) if sizes[path] > self.max_size]
            try:
                done += await self._rotate_instance(live, due)
            except OSError as exc:
                log.warning("instance %s: log rotation failed: %s", live.id, exc)
        return done

    async def _rotate_instance(self, live: LiveInstance, due: list[Path]) -> list[Rotation]:
        done = []
        for path in due:
            if live.deleted:
                break
            if path == live.paths.console_log:
                rotation = await self._rotate_console(live)
            else:
                # Their writers append (O_APPEND) and nothing keeps offsets into them: no lock.
                rotation = await asyncio.to_thread(rotate_file, path, self.max_files, self.ledger)
            if rotation is not None:
                log.info("instance %s: rotated %s (%d bytes into %s)",
                         live.id, path.name, rotation.removed, rotation.copy.name)
                done.append(rotation)
        return done

    async def _rotate_console(self, live: LiveInstance) -> Rotation | None:
        """The head is copied first, outside the instance's lock (a stop or delete need not wait
        for up to ``max_size`` bytes of copying); the cut, the scanner's and the record's boot
        offsets move together under it. An instance busy with an operation waits for the next
        pass."""
        path = live.paths.console_log
        if live.lock.locked():
            return None
        prepared = await asyncio.to_thread(prepare_rotation, path)
        if prepared is None:
            return None
        try:
            if live.lock.locked() or live.deleted:
                return None
            async with live.lock:
                if live.deleted:
                    return None
                scanner = live.scanner
                if scanner is None:
                    rotation = await asyncio.to_thread(prepared.commit, self.max_files, self.ledger)
                else:
                    # Held scanned to the end: every byte about to be cut has been read for markers.
                    async with scanner.hold():
                        rotation = await asyncio.to_thread(prepared.commit, self.max_files, self.ledger)
                        await asyncio.to_thread(scanner.rebase, rotation.removed, rotation.copy)
                boot_offset = max(0, live.record.console_offset - rotation.removed)
                await records.update(live, console_offset=boot_offset)
        finally:
            await asyncio.to_thread(prepared.close)
        return rotation
