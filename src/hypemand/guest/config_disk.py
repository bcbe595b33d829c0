"""Per-instance guest disks written by the host: the config disk and the overlay disk.

Config disk format (read by ``init/config_disk.c``; documented in ``README.md``)::

    header (32 bytes, little endian)
      0  magic    b"HYPEMANC"
      8  u32      format version (1)
      12 u32      payload length
      16 u32      CRC-32 (zlib) of the payload
      20 12 bytes zero
    payload: records, each
      u16 type, u16 zero, u32 value length, value bytes (UTF-8, no NUL)
    zero padding to a multiple of 4096 bytes (block devices need whole sectors)
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
import zlib
from enum import IntEnum, StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from hypemand.errors import BadRequest, DependencyMissing, InsufficientStorage
from hypemand.fsutil import write_atomic

MAGIC = b"HYPEMANC"
FORMAT_VERSION = 1
HEADER_SIZE = 32
MAX_PAYLOAD = 8 << 20  # the C reader refuses more
DISK_ALIGNMENT = 4096


class RecordType(IntEnum):
    ENTRYPOINT_ARG = 1
    CMD_ARG = 2
    ENV = 3
    WORKDIR = 4
    HOSTNAME = 5
    NET_IP = 16
    NET_PREFIX = 17
    NET_GATEWAY = 18
    NET_DNS = 19
    # One per volume, in disk order: "<mode>:<serial>:<upper serial or empty>:<mount path>"
    # (the path last, so it may hold colons). Guests older than volumes skip it.
    VOLUME = 32


class VolumeMode(StrEnum):
    RO = "ro"
    RW = "rw"
    OVERLAY = "overlay"  # read-only base, overlayfs with upper/ and work/ on the upper disk


class GuestVolume(BaseModel):
    """A volume the guest's init mounts before the program starts (disks found by serial)."""

    mode: VolumeMode
    serial: str
    upper_serial: str | None = None
    path: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or "\n" in value:
            raise ValueError("a volume's mount path must be absolute and not /")
        return value

    def encoded(self) -> str:
        return f"{self.mode.value}:{self.serial}:{self.upper_serial or ''}:{self.path}"


class GuestNetwork(BaseModel):
    ip: str
    prefix: int = Field(ge=0, le=32)
    gateway: str | None = None
    dns: list[str] = []

    @field_validator("ip", "gateway")
    @classmethod
    def _ipv4(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.IPv4Address(value)
        return value

    @field_validator("dns")
    @classmethod
    def _ipv4_list(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.IPv4Address(item)
        return value

    @classmethod
    def user_mode(cls) -> GuestNetwork:
        """The fixed addresses of QEMU user-mode networking (slirp)."""
        return cls(ip="10.0.2.15", prefix=24, gateway="10.0.2.2", dns=["10.0.2.3"])


class GuestConfig(BaseModel):
    """What PID 1 in the guest needs to run the program."""

    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    working_dir: str = "/"
    hostname: str = "hypeman"
    network: GuestNetwork | None = None
    volumes: list[GuestVolume] = []

    @field_validator("env")
    @classmethod
    def _env_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key or "=" in key:
                raise ValueError(f"invalid environment variable name {key!r}")
        return value


def _record(kind: RecordType, value: str) -> bytes:
    data = value.encode()
    if b"\0" in data:
        raise BadRequest(f"config value for {kind.name.lower()} contains a NUL byte")
    return struct.pack("<HHI", kind, 0, len(data)) + data


def encode_config(config: GuestConfig) -> bytes:
    records = [_record(RecordType.ENTRYPOINT_ARG, a) for a in config.entrypoint]
    records += [_record(RecordType.CMD_ARG, a) for a in config.cmd]
    records += [_record(RecordType.ENV, f"{k}={v}") for k, v in config.env.items()]
    records.append(_record(RecordType.WORKDIR, config.working_dir or "/"))
    records.append(_record(RecordType.HOSTNAME, config.hostname))
    if config.network is not None:
        net = config.network
        records.append(_record(RecordType.NET_IP, net.ip))
        records.append(_record(RecordType.NET_PREFIX, str(net.prefix)))
        if net.gateway:
            records.append(_record(RecordType.NET_GATEWAY, net.gateway))
        records += [_record(RecordType.NET_DNS, d) for d in net.dns]
    records += [_record(RecordType.VOLUME, volume.encoded()) for volume in config.volumes]
    payload = b"".join(records)
    if len(payload) > MAX_PAYLOAD:
        raise BadRequest(f"guest config is {len(payload)} bytes, more than the {MAX_PAYLOAD} allowed")
    header = MAGIC + struct.pack("<III", FORMAT_VERSION, len(payload), zlib.crc32(payload))
    image = header.ljust(HEADER_SIZE, b"\0") + payload
    return image + b"\0" * (-len(image) % DISK_ALIGNMENT)


def write_config_disk(path: Path, config: GuestConfig) -> None:
    write_atomic(path, encode_config(config))


def make_overlay_disk(path: Path, size_bytes: int, label: str = "hm-overlay") -> None:
    """Create a sparse ext4 file: the guest's writable layer (upper/ and work/ made by init);
    also an overlay volume's private upper disk (``label`` hm-vol-upper)."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
    if mke2fs is None:
        raise DependencyMissing("making overlay disks needs mke2fs: install e2fsprogs")
    if size_bytes < 8 << 20:
        raise BadRequest("overlay disk must be at least 8 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.truncate(size_bytes)
    # Lazy init leaves inode tables and journal unwritten: they are zero in a sparse file already.
    result = subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-m", "0", "-L", label,
         "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(tmp)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        if "No space left" in result.stderr:
            raise InsufficientStorage("no space left on the server's data disk for the overlay disk")
        raise RuntimeError(f"mke2fs {path.name}: {result.stderr.strip()}")
    tmp.replace(path)
