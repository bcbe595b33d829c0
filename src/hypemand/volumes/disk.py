"""A volume's disk: a sparse file of the volume's size holding an ext4 file system, made by
``mke2fs`` (``-d`` copies a directory tree in, with owners, modes, links and xattrs). Blocking:
runs in a worker thread.

``lazy_itable_init`` and ``lazy_journal_init``: mke2fs punches the whole file first (discard),
so the inode tables and the journal already read as zeros and are marked so; a 10 GiB volume
takes ~4 MB of the data disk and 20 ms. ``-m 0``: no blocks reserved for root, the volume's
size is all the user's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hypemand.errors import DependencyMissing, DomainError
from hypemand.volumes.archive import Unpacked
from hypemand.volumes.models import ArchiveTooLarge

INODE_RATIO = 16384  # mke2fs's default bytes per inode for file systems of 512 MiB and more
_FULL = ("Could not allocate", "No free space", "No space left")


class VolumeDiskFailed(DomainError):
    """mke2fs failed for a reason that is the server's, not the request's."""


def max_entries(size_bytes: int) -> int:
    """How many files, directories and links a volume of this size has inodes for."""
    return size_bytes // INODE_RATIO - 16  # the first inodes are ext4's own


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise DependencyMissing(f"{name} is not installed (apt-get install e2fsprogs)")
    return path


def make_disk(disk: Path, size_bytes: int, tree: Path | None = None,
              unpacked: Unpacked | None = None) -> None:
    """Create ``disk`` (must not exist) as an ext4 file system of ``size_bytes``, holding a copy
    of ``tree`` when given (``unpacked`` says what the archive set on its root directory)."""
    fd = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    extended = "lazy_itable_init=1,lazy_journal_init=1"
    if unpacked is not None and unpacked.root_owner is not None:
        extended += f",root_owner={unpacked.root_owner[0]}:{unpacked.root_owner[1]}"
    argv = [_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-m", "0", "-E", extended]
    if tree is not None:
        argv += ["-d", str(tree)]
    result = subprocess.run([*argv, str(disk)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        words = (result.stderr or result.stdout).strip()
        if tree is not None and any(marker in words for marker in _FULL):
            raise ArchiveTooLarge(f"the archive's content and the file system's own structures do not fit "
                                  f"in {size_bytes >> 30} GiB ({words.splitlines()[-1]})")
        raise VolumeDiskFailed(f"mke2fs failed: {words}")
    if unpacked is not None and unpacked.root_mode is not None:
        mode = f"0{0o40000 | unpacked.root_mode:o}"
        result = subprocess.run([_tool("debugfs"), "-w", "-R", f"set_inode_field / mode {mode}", str(disk)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise VolumeDiskFailed(f"debugfs could not set the root's mode: {result.stderr.strip()}")
