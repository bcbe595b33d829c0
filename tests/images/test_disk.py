"""Disk building: ext4 sized to fit (checked with debugfs/e2fsck) and erofs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hypemand.images.disk import DiskFormat, build_disk


def make_tree(root: Path, small_files: int) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    many = root / "many"
    many.mkdir()
    for i in range(small_files):
        (many / f"file-{i:05d}-with-a-longish-name").write_text(str(i))
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "owned").write_text("x")
    os.chown(root / "owned", 4321, 8765)
    os.chmod(root / "owned", 0o4750)
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))


def test_ext4_fits_an_inode_heavy_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, small_files=5000)
    disk = tmp_path / "rootfs.ext4"
    size = build_disk(root, disk, DiskFormat.EXT4)
    assert size == disk.stat().st_size
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    def debugfs(command: str) -> str:
        return subprocess.run(["debugfs", "-R", command, str(disk)], capture_output=True, text=True,
                              check=True).stdout

    assert debugfs("cat /many/file-04999-with-a-longish-name") == "4999"
    owned = debugfs("stat /owned")
    assert "User:  4321" in owned and "Group:  8765" in owned and "Mode:  04750" in owned
    assert "Type: character special" in debugfs("stat /null")


@pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="fsck.erofs not installed")
def test_erofs_builds_and_checks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, small_files=200)
    disk = tmp_path / "rootfs.erofs"
    size = build_disk(root, disk, DiskFormat.EROFS)
    assert size == disk.stat().st_size and size > 3 << 20  # the random file does not compress
    check = subprocess.run(["fsck.erofs", str(disk)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
