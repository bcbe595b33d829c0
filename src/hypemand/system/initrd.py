"""The project's own initrd: the guest binary as ``/init`` plus the kernel modules it loads.

Written as a cpio "newc" archive by Python so that it is reproducible: entries sorted,
mtimes, owners and inode numbers fixed. The same inputs always give the same bytes, and the
file is stored by the hash of those bytes::

    <system_dir>/initrd/<content-hash>/initrd        the archive (uncompressed, see README)
    <system_dir>/initrd/<content-hash>/initrd.json   InitrdInfo: what went in

A VM that went to standby on one initrd must wake on the very same one, so old ones are never
deleted here.

Inside the archive::

    /init                      the guest binary (PID 1 + agent)
    /etc/hypeman/modules       "<group> <path>" lines: the files to load for module <group>,
                               dependencies first; init loads a group when it needs it
    /lib/modules/<ver>/...     the modules
    /dev/console               so the kernel can hand PID 1 a console before devtmpfs exists
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from hypemand.fsutil import write_atomic, write_model_atomic
from hypemand.layout import SystemPaths
from hypemand.system.kernel import Kernel

MODULE_LIST_PATH = "etc/hypeman/modules"
FIXED_MTIME = 0


class InitrdInfo(BaseModel):
    version: str  # the content hash; also the directory name
    kernel_version: str
    guest_binary_sha256: str
    modules: dict[str, list[str]]  # group -> paths inside the initrd, dependencies first
    size: int


class Initrd(BaseModel):
    path: Path
    info: InitrdInfo


@dataclass(frozen=True)
class CpioEntry:
    name: str  # without leading slash
    mode: int  # including the file type bits
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_cpio_newc(entries: list[CpioEntry]) -> bytes:
    """Serialize entries (sorted by name, fixed metadata) as a cpio newc archive."""
    out = bytearray()
    ordered = sorted(entries, key=lambda e: e.name)
    for inode, entry in enumerate([*ordered, CpioEntry("TRAILER!!!", 0)], start=1):
        is_trailer = entry.name == "TRAILER!!!"
        name = entry.name.encode() + b"\0"
        fields = [
            0 if is_trailer else inode,
            entry.mode,
            0,  # uid
            0,  # gid
            0 if is_trailer else (2 if stat.S_ISDIR(entry.mode) else 1),
            FIXED_MTIME,
            len(entry.data),
            0,  # dev major
            0,  # dev minor
            entry.rdev_major,
            entry.rdev_minor,
            len(name),
            0,  # check (only used by the "crc" format)
        ]
        header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def _with_parent_dirs(entries: list[CpioEntry]) -> list[CpioEntry]:
    names = {e.name for e in entries}
    dirs = set()
    for entry in entries:
        parent = Path(entry.name).parent
        while str(parent) != ".":
            dirs.add(str(parent))
            parent = parent.parent
    return entries + [CpioEntry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs - names)]


def initrd_entries(guest_binary: bytes, kernel: Kernel) -> tuple[list[CpioEntry], dict[str, list[str]]]:
    entries = [
        CpioEntry("init", stat.S_IFREG | 0o755, guest_binary),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
    ]
    for mount_point in ("proc", "sys", "run", "tmp"):
        entries.append(CpioEntry(mount_point, stat.S_IFDIR | 0o755))
    module_paths: dict[str, list[str]] = {}
    files: set[str] = set()
    for group, sequence in kernel.info.modules.items():
        for relative in sequence:
            inside = f"lib/modules/{kernel.info.version}/{relative}"
            module_paths.setdefault(group, []).append("/" + inside)
            files.add(relative)
    for relative in sorted(files):
        data = (kernel.modules_dir / relative).read_bytes()
        entries.append(CpioEntry(f"lib/modules/{kernel.info.version}/{relative}", stat.S_IFREG | 0o644, data))
    module_list = "".join(
        f"{group} {path}\n" for group, paths in module_paths.items() for path in paths
    ).encode()
    entries.append(CpioEntry(MODULE_LIST_PATH, stat.S_IFREG | 0o644, module_list))
    return _with_parent_dirs(entries), module_paths


def build_initrd(system: SystemPaths, kernel: Kernel, guest_binary: Path) -> Initrd:
    """Return the initrd for this kernel and guest binary, writing it if it is new.

    Building the archive in memory costs a few milliseconds (about 1 MB of modules), so the
    content hash itself is the cache key: inputs unchanged means same hash means nothing written.
    """
    binary = guest_binary.read_bytes()
    entries, module_paths = initrd_entries(binary, kernel)
    archive = write_cpio_newc(entries)
    version = hashlib.sha256(archive).hexdigest()[:16]
    files = system.initrd(version)
    path = files.archive
    info_path = files.info
    if info_path.exists() and path.exists():
        return Initrd(path=path, info=InitrdInfo.model_validate_json(info_path.read_bytes()))
    info = InitrdInfo(
        version=version,
        kernel_version=kernel.info.version,
        guest_binary_sha256=hashlib.sha256(binary).hexdigest(),
        modules=module_paths,
        size=len(archive),
    )
    write_atomic(path, archive)
    write_model_atomic(info_path, info)  # last: its presence marks the directory complete
    return Initrd(path=path, info=info)
