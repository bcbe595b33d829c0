"""The files of a saved VM, wherever they lie: an instance's own directory (its standby), a
stored snapshot's payload, or a fork's staging copy. The same names in each, so one set of
operations moves a saved VM between them.

Everything here is blocking (copies, hashing, fsync): callers run it in a worker thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

from hypemand.fsutil import write_model_atomic
from hypemand.hypervisor.base import LAUNCH_RECORD, MEMORY_FILE
from hypemand.layout import (
    CONFIG_DISK,
    OVERLAY_DISK,
    STANDBY_RECORD,
    STATE_FILE,
    VOLUME_OVERLAYS,
    SavedVMPaths,
)
from hypemand.savedvm.digest import file_digest, verify_file
from hypemand.savedvm.errors import SavedVMCorrupt
from hypemand.savedvm.models import StandbyRecord
from hypemand.savedvm.sparse import copy_sparse, link_or_copy, make_durable, tree_allocated_bytes

# The payload of a saved VM. Add a file here and every copy, replacement, fork and digest
# carries it. Disks: what any saved VM holds (the writable root layer, the program's config disk
# and the hypervisor's launch record), plus the private upper disks of overlay volumes
# (``vol-overlays/<volume id>.raw``, whichever exist: see ``disk_files``). A Standby one adds the
# guest's RAM and device state. The volumes themselves are not copied: only read-only ones are
# allowed in a snapshot or fork, and they are shared.
DISK_FILES = (OVERLAY_DISK, CONFIG_DISK, LAUNCH_RECORD)
MEMORY = MEMORY_FILE
DEVICE_STATE = STATE_FILE
PAYLOAD = (*DISK_FILES, MEMORY, DEVICE_STATE)


class SavedVMFiles:
    """One directory holding a saved VM's files (paths from :class:`SavedVMPaths`)."""

    def __init__(self, paths: SavedVMPaths) -> None:
        self.paths = paths

    @property
    def directory(self) -> Path:
        return self.paths.directory

    @property
    def memory(self) -> Path:
        return self.paths.memory_file

    @property
    def device_state(self) -> Path:
        return self.paths.state_file

    @property
    def standby_record(self) -> Path:
        return self.paths.standby_record

    def volume_overlay_files(self) -> tuple[str, ...]:
        """Blocking: the names (relative to the directory) of the overlay volumes' upper disks."""
        try:
            entries = sorted(self.paths.file(VOLUME_OVERLAYS).iterdir())
        except FileNotFoundError:
            return ()
        return tuple(
            f"{VOLUME_OVERLAYS}/{entry.name}"
            for entry in entries
            if entry.is_file() and entry.suffix == ".raw"
        )

    def disk_files(self) -> tuple[str, ...]:
        """Blocking: the disks of this saved VM, by name (``DISK_FILES`` and the volume overlays)."""
        return DISK_FILES + self.volume_overlay_files()

    # ---- moving a saved VM ------------------------------------------------------------------

    def copy_to(
        self, target: SavedVMFiles, *, with_memory: bool, with_state: bool, durable: bool = True
    ) -> None:
        """Sparse copies (reflinks where the filesystem can) of the disks, and of the RAM and
        device state when asked. ``durable=False`` skips the fsyncs (see :func:`make_durable`)."""
        target.directory.mkdir(parents=True, exist_ok=True)
        disks = self.disk_files()
        names = disks + ((MEMORY,) if with_memory else ()) + ((DEVICE_STATE,) if with_state else ())
        for name in names:
            source = self.paths.file(name)
            if name in disks and not source.exists():
                continue  # a saved VM without a config disk yet, say
            target.paths.file(name).parent.mkdir(exist_ok=True)
            copy_sparse(source, target.paths.file(name), durable=durable)

    def replace_with(self, source: SavedVMFiles, *, with_memory: bool) -> None:
        """This directory's saved VM becomes copies of ``source``'s. The instance will write to
        them (its RAM file is mapped shared), so nothing is linked."""
        for name in (*PAYLOAD, STANDBY_RECORD, *self.volume_overlay_files()):
            self.paths.file(name).unlink(missing_ok=True)
        source.copy_to(self, with_memory=with_memory, with_state=with_memory)

    def fork_from(self, source: SavedVMFiles, *, with_memory: bool) -> None:
        """A new directory for a fork: its writable disks are copies; its RAM file is a hard link
        to the source's, mapped privately (share=off) by the fork, so the file is never written
        and ten forks share one copy on disk and in the page cache."""
        self.directory.mkdir(parents=True)
        for name in source.disk_files():
            if source.paths.file(name).exists():
                # Copies, never links: each fork writes its own overlays.
                self.paths.file(name).parent.mkdir(exist_ok=True)
                copy_sparse(source.paths.file(name), self.paths.file(name))
        if with_memory:
            link_or_copy(source.memory, self.memory)
            copy_sparse(source.device_state, self.device_state)

    def make_durable(self) -> None:
        overlays = self.paths.file(VOLUME_OVERLAYS)
        if overlays.is_dir():
            make_durable(overlays)
        make_durable(self.directory)

    # ---- the standby record -----------------------------------------------------------------

    def load_standby(self) -> StandbyRecord:
        try:
            return StandbyRecord.model_validate_json(self.standby_record.read_bytes())
        except FileNotFoundError:
            raise SavedVMCorrupt(f"{self.directory.name}: the standby record is missing") from None
        except ValueError as exc:
            raise SavedVMCorrupt(f"{self.directory.name}: the standby record is unreadable: {exc}") from None

    def write_standby(self, record: StandbyRecord) -> None:
        write_model_atomic(self.standby_record, record)

    def has_standby(self) -> bool:
        return self.standby_record.exists()

    def forget_standby(self) -> None:
        """Forget the saved device state; the RAM file stays (it is the VM's RAM). The record goes
        first, so a crash in between leaves a stale state file, never a claim to Standby."""
        self.standby_record.unlink(missing_ok=True)
        self.device_state.unlink(missing_ok=True)

    def verify_standby(self, record: StandbyRecord) -> None:
        """The device state matches its digest and the RAM file has the size that was saved."""
        verify_file(self.device_state, record.state_digest)
        size = self.memory.stat().st_size
        if size != record.memory_size:
            raise SavedVMCorrupt(
                f"{self.directory.name}: the saved RAM file is {size} bytes, {record.memory_size} were saved"
            )

    # ---- contents ---------------------------------------------------------------------------

    def digests(self) -> dict[str, str]:
        """The content digest of every payload file present, by name."""
        found = {path.name: file_digest(path) for path in sorted(self.directory.iterdir()) if path.is_file()}
        found.update({name: file_digest(self.paths.file(name)) for name in self.volume_overlay_files()})
        return found

    def allocated_bytes(self) -> int:
        return tree_allocated_bytes(self.directory)


@dataclass
class VerifiedFiles:
    """Files already checked against their digest, by identity, so a file that did not change is
    not hashed again (a fork of a 1 GiB snapshot would otherwise re-read its RAM every time)."""

    _seen: dict[Path, tuple[int, int, int]] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)

    def verify(self, files: SavedVMFiles, digests: dict[str, str], label: str) -> None:
        """Every file of ``digests`` exists among ``files`` and has its recorded content."""
        for name, digest in digests.items():
            path = files.paths.file(name)
            try:
                info = path.stat()
            except FileNotFoundError:
                raise SavedVMCorrupt(f"{label}: {name} is missing") from None
            identity = _identity(info)
            with self._lock:
                if self._seen.get(path) == identity:
                    continue
            try:
                verify_file(path, digest)
            except SavedVMCorrupt as exc:
                raise SavedVMCorrupt(f"{label}: {exc}") from None
            with self._lock:
                self._seen[path] = identity

    def mark(self, path: Path) -> None:
        """``path`` was just checked by other means (an expansion verifies while it writes)."""
        identity = _identity(path.stat())
        with self._lock:
            self._seen[path] = identity


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    """What must stay the same for an earlier digest check to hold: the inode, its size and its
    modification time (every write moves it). Not the ctime: a fork's hard link to the RAM file
    changes that without touching the content. A change that keeps the mtime (a deliberate
    ``touch -d``, or media decay) is caught at the next server start, which checks afresh."""
    return (info.st_ino, info.st_size, info.st_mtime_ns)
