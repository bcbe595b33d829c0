"""Turn an unpacked root directory into a read-only disk image.

ext4 (default) is built with ``mke2fs -d`` without a journal and without reserved blocks,
sized from a walk of the tree (data blocks, directory blocks, inode table) plus slack; if
the estimate was short, the build is retried larger. erofs (``mkfs.erofs -zlz4hc``) is the
alternative: smaller, slightly slower to build, and read-only by construction.
Both keep owners, modes, device nodes, symlinks, hard links and xattrs.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
import subprocess
from pathlib import Path

from hypemand.errors import DependencyMissing
from hypemand.images.errors import ConversionFailed

BLOCK = 4096
INODE_SIZE = 256
MIN_EXT4_BYTES = 16 << 20


class DiskFormat(enum.StrEnum):
    EXT4 = "ext4"
    EROFS = "erofs"


def _blocks(nbytes: int) -> int:
    return (nbytes + BLOCK - 1) // BLOCK


def estimate_tree(root: Path) -> tuple[int, int]:
    """(bytes the tree needs in 4 KiB blocks, number of inodes)."""
    blocks = 1
    inodes = 1
    for dirpath, dirnames, filenames in os.walk(root):
        names = dirnames + filenames
        # A directory block holds ~4096 / (8 + name length) entries.
        blocks += _blocks(sum(8 + len(n) + 4 for n in names) + 24)
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                blocks += _blocks(st.st_size) + (1 if st.st_size > 4 * 32768 * BLOCK else 0)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                blocks += 1
    return blocks * BLOCK, inodes


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise DependencyMissing(f"{name} is not installed (apt-get install e2fsprogs erofs-utils)")
    return path


def build_ext4(root: Path, out: Path, label: str = "rootfs") -> int:
    data_bytes, inodes = estimate_tree(root)
    inode_count = inodes + inodes // 5 + 64
    size = data_bytes + inode_count * INODE_SIZE
    size = max(MIN_EXT4_BYTES, size + size // 5 + (4 << 20))
    mke2fs = _tool("mke2fs")
    last_error = ""
    for _attempt in range(4):
        out.unlink(missing_ok=True)
        size = (size + BLOCK - 1) // BLOCK * BLOCK
        result = subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE),
             "-O", "^has_journal,^resize_inode", "-m", "0", "-N", str(inode_count), "-L", label,
             "-E", "lazy_itable_init=0,root_owner=0:0", "-d", str(root), str(out), f"{size // 1024}k"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode == 0:
            return out.stat().st_size
        last_error = (result.stderr or result.stdout).strip()
        size += size // 2
        inode_count += inode_count // 2
    out.unlink(missing_ok=True)
    raise ConversionFailed(f"mke2fs failed: {last_error}")


def build_erofs(root: Path, out: Path) -> int:
    mkfs = _tool("mkfs.erofs")
    out.unlink(missing_ok=True)
    # erofs-utils 1.5 (bookworm) has no volume-label option.
    result = subprocess.run([mkfs, "--quiet", "-zlz4hc", str(out), str(root)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        out.unlink(missing_ok=True)
        raise ConversionFailed(f"mkfs.erofs failed: {(result.stderr or result.stdout).strip()}")
    return out.stat().st_size


def build_disk(root: Path, out: Path, fmt: DiskFormat) -> int:
    """Build ``out`` from ``root`` in format ``fmt``; return the disk's size in bytes."""
    if fmt is DiskFormat.EROFS:
        return build_erofs(root, out)
    return build_ext4(root, out)
