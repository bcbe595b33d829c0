"""Sparse test files that look like guest RAM, and an optional reflink-capable XFS mount."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

MIB = 1 << 20
PAGE = 4096


def write_guest_memory(path: Path, size: int = 32 * MIB, seed: int = 1) -> Path:
    """A sparse file like a guest's RAM: holes, random pages, recurring compressible pages, and
    runs of zero pages written as data. About a third of it is written."""
    rng = random.Random(seed)
    # Compressible pages that recur across the file, like a program's text in a guest.
    words = [rng.randbytes(rng.randrange(2, 9)) for _ in range(300)]
    text = b" ".join(rng.choice(words) for _ in range(64 * PAGE // 4))[: 64 * PAGE]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.ftruncate(fd, size)
        page = 3  # a hole first
        while page < size // PAGE - 64:
            pages = rng.choice((1, 2, 3, 8, 17))
            kind = rng.choice(("random", "text", "text", "zero"))
            if kind == "random":
                data = rng.randbytes(pages * PAGE)
            elif kind == "text":
                start = rng.randrange(0, 64 - pages) * PAGE
                data = text[start : start + pages * PAGE]
            else:
                data = bytes(pages * PAGE)
            os.pwrite(fd, data, page * PAGE)
            page += pages + rng.choice((0, 0, 1, 5, 40))
    finally:
        os.close(fd)
    return path


@pytest.fixture
def guest_memory(tmp_path: Path) -> Path:
    return write_guest_memory(tmp_path / "memory.ram")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small XFS filesystem with reflink on a loop device (root and xfsprogs needed)."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted XFS needs root")
    for tool in ("mkfs.xfs", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt-get install xfsprogs; scripts/setup.sh --test does)")
    base = tmp_path_factory.mktemp("xfs")
    image, mountpoint = base / "xfs.img", base / "mnt"
    mountpoint.mkdir()
    with image.open("wb") as handle:
        handle.truncate(320 * MIB)  # sparse; XFS wants at least 300 MB
    device = _run("losetup", "-f", "--show", str(image))
    mounted = False
    try:
        _run("mkfs.xfs", "-q", "-m", "reflink=1", device)
        _run("mount", device, str(mountpoint))
        mounted = True
        directory = mountpoint / uuid.uuid4().hex
        directory.mkdir()
        yield directory
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False)
        subprocess.run(["losetup", "-d", device], check=False)
        image.unlink(missing_ok=True)
