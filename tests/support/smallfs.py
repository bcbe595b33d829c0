"""Small filesystems a test makes, mounts and always unmounts: to fill a disk on purpose.

Needs root (mount) and loop devices for ext4; a test without them is skipped, not failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypemand.hypervisor.storage import free_bytes

MIB = 1 << 20
UMOUNT_ATTEMPTS = 50  # x 0.1 s: a process that just ended may still hold the mount for a moment


def _need_root() -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a test filesystem needs root and mount(8)")


@contextlib.contextmanager
def mounted_ext4(base: Path, size_mib: int) -> Iterator[Path]:
    """An ext4 filesystem of ``size_mib`` in an image file, loop-mounted at ``base/mnt``. No
    root reserve (-m 0): free space is the same for root and everyone else."""
    _need_root()
    image, mountpoint = base / "fs.img", base / "mnt"
    mountpoint.mkdir(parents=True)
    with open(image, "wb") as file:
        file.truncate(size_mib * MIB)
    # 4 KiB blocks as on a real data disk (mkfs would pick 1 KiB for a filesystem this small).
    mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(image)]
    subprocess.run(mkfs, check=True, capture_output=True)
    mount = ["mount", "-o", "loop", str(image), str(mountpoint)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        image.unlink()
        pytest.skip(f"cannot loop-mount a test filesystem: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _unmount(mountpoint)
        image.unlink()


@contextlib.contextmanager
def mounted_tmpfs(base: Path, size_mib: int) -> Iterator[Path]:
    _need_root()
    mountpoint = base / "tmpfs"
    mountpoint.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "hm-test", str(mountpoint)]
    subprocess.run(mount, check=True)
    try:
        yield mountpoint
    finally:
        _unmount(mountpoint)


def _unmount(mountpoint: Path) -> None:
    for _ in range(UMOUNT_ATTEMPTS):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    # Still busy: detach it so nothing stays mounted, and fail the test, which left a user.
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    raise AssertionError(f"{mountpoint} was still in use after the test")


def fill(directory: Path, leave: int = 0) -> Path:
    """Take all free space of ``directory``'s filesystem but ``leave`` bytes, in one file
    (returned: delete it to give the space back). ``leave=0`` fills it until a write fails."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = free_bytes(directory) - leave
        # The file's own extent tree takes a few blocks: back off until it fits.
        while size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size -= MIB
        if leave == 0:
            chunk = b"\xff" * 4096
            os.lseek(fd, 0, os.SEEK_END)
            with contextlib.suppress(OSError):  # ext4 reserves at write(): ENOSPC comes here
                while True:
                    os.write(fd, chunk)
            os.fsync(fd)
    finally:
        os.close(fd)
    return ballast
