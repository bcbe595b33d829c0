"""Archives for the volume tests (made with tarfile, hostile ones included) and a reader of the
ext4 disks the server builds (debugfs: no mount, no root needed to read)."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, uid: int = 0,
          gid: int = 0, linkname: str = "", mtime: int = 1_700_000_000) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.mtime, info.linkname = mode, uid, gid, mtime, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_gz(*entries: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def dataset() -> bytes:
    """A small tree with modes, owners, a symlink and a hard link that stay inside."""
    return tar_gz(
        entry("./", tarfile.DIRTYPE, mode=0o751, uid=0, gid=0),
        entry("data", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001),
        entry("data/readme.txt", data=b"hello volume\n", mode=0o640, uid=1000, gid=1001),
        entry("data/run.sh", data=b"#!/bin/sh\necho hi\n", mode=0o4755, uid=0, gid=0),
        entry("data/link", tarfile.SYMTYPE, linkname="readme.txt"),
        entry("data/up", tarfile.SYMTYPE, linkname="../data/readme.txt"),
        entry("data/hard", tarfile.LNKTYPE, linkname="data/readme.txt"),
        entry("empty", tarfile.DIRTYPE, mode=0o1777),
    )


# name -> (archive, words the refusal names)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "traversal": (tar_gz(entry("ok.txt", data=b"x"), entry("../escape.txt", data=b"x")), "'..'"),
    "absolute": (tar_gz(entry("/etc/passwd", data=b"x")), "absolute"),
    "symlink-absolute": (tar_gz(entry("evil", tarfile.SYMTYPE, linkname="/etc")), "points outside"),
    "symlink-climbs": (tar_gz(entry("a", tarfile.DIRTYPE, mode=0o755),
                              entry("a/evil", tarfile.SYMTYPE, linkname="../../etc")), "points outside"),
    "write-through-symlink": (tar_gz(entry("evil", tarfile.SYMTYPE, linkname="."),
                                     entry("evil/x", data=b"x")), "below a symbolic link"),
    "hardlink-escape": (tar_gz(entry("evil", tarfile.LNKTYPE, linkname="../../etc/passwd")), "'..'"),
    "hardlink-absolute": (tar_gz(entry("evil", tarfile.LNKTYPE, linkname="/etc/passwd")), "absolute"),
    "hardlink-missing": (tar_gz(entry("evil", tarfile.LNKTYPE, linkname="nothing")),
                         "earlier in the archive"),
    "char-device": (tar_gz(entry("null", tarfile.CHRTYPE)), "device node"),
    "block-device": (tar_gz(entry("sda", tarfile.BLKTYPE)), "device node"),
    "fifo": (tar_gz(entry("pipe", tarfile.FIFOTYPE)), "FIFO"),
    "not-gzip": (b"this is not an archive" * 10, "not a readable tar.gz"),
    "not-tar": (__import__("gzip").compress(b"\x01" * 4096), "not a readable tar.gz"),
}


@dataclass
class Ext4Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int


def ext4_stat(disk: Path, path: str) -> Ext4Entry:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", out)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    size = re.search(r"Size: (\d+)", out)
    assert found and owner and size, f"debugfs stat {path}: {out}"
    return Ext4Entry(found.group(1), int(found.group(2), 8), int(owner.group(1)), int(owner.group(2)),
                     int(size.group(1)))


def ext4_cat(disk: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True,
                          check=True).stdout


def ext4_names(disk: Path, path: str = "/") -> set[str]:
    out = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6} - {".", ".."}


def ext4_link_target(disk: Path, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r'Fast link dest: "([^"]*)"', out)
    assert found, out
    return found.group(1)


def ext4_inode(disk: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"Inode: (\d+)", out)
    assert found, out
    return int(found.group(1))
