"""Volumes attached to instances: the rules of an attachment (pure), the attachments as the
volume domain sees them, and the disks a boot gives the guest.

**Attachments are stored only in instance records** (``InstanceRecord.volumes``); a volume's
``attachments`` are derived from every instance's (:meth:`Attachments.attachments_of`), plus the
attachments of creates, forks and restores in flight (reserved here between their check and the
moment their record is in the table, so two of them never both pass the sharing rule).

Rules (hypeman-behaviour §3.3, §5.5):

* any number of read-only attachments of a volume, or exactly one read-write one, across all
  instances whatever their state (409 otherwise); one instance attaches a volume once;
* overlay mode (a read-only base shared by many VMs plus a private copy-on-write upper disk of
  ``overlay_size``) requires ``readonly``;
* mount paths absolute, normalized, unique per instance, never a system directory (400);
* at most what the board can carry: an overlay volume takes two virtio devices (400);
* attach and detach only while the instance is Stopped (409), as the reference: the disks are
  on QEMU's command line, which a running VM, a standby and a snapshot keep.

Disks: after the root, overlay and config disks, each volume in record order as a virtio-blk
drive with serial ``hm-vol<N>`` (read-only ones without QEMU's image lock, like the shared root
image; the read-write one locked), an overlay volume's upper disk right after its base as
``hm-vup<N>``. The guest's init finds them by serial and mounts them before the program starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hypemand.errors import BadRequest, Conflict
from hypemand.guest.config_disk import GuestVolume, VolumeMode
from hypemand.hypervisor.base import Board, DiskConfig
from hypemand.hypervisor.qemu_cmdline import free_virtio_slots
from hypemand.instances.live import InstanceTable
from hypemand.instances.models import VolumeMount, VolumeMountRecord
from hypemand.layout import InstancePaths
from hypemand.units import UnitError, format_size, parse_size, round_up
from hypemand.volumes.models import VolumeAttachment

# The reference's own limit (Cloud Hypervisor's): at most 23 volume devices. Our boards may
# carry fewer (qemu-microvm: 24 virtio-mmio transports, 5 taken by every VM).
REFERENCE_MAX_VOLUME_DEVICES = 23
# Directories of the image's system and of what init mounts into the guest: a volume over one
# of them (or below it) would hide the program's own files or the kernel's interfaces. The
# reference's list, plus /lib32 and /libx32 (multilib images keep their loaders there).
SYSTEM_DIRECTORIES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root",
    "/run", "/sbin", "/sys", "/tmp", "/usr", "/var",
)  # fmt: skip
MAX_MOUNT_PATH = 1024
MIN_VOLUME_OVERLAY = 16 << 20
MAX_VOLUME_OVERLAY = 100 << 30
SIZE_GRANULE = 1 << 20
VOLUME_SERIAL = "hm-vol{index}"
UPPER_SERIAL = "hm-vup{index}"


class VolumeRef(Protocol):
    """What the instance domain needs of a volume's record."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


class VolumeCatalog(Protocol):
    """The volume domain's service as this domain uses it (``hypemand.volumes.service``)."""

    def resolve(self, ref: str) -> VolumeRef: ...

    def disk_path(self, volume_id: str) -> Path: ...

    def lock(self, volume_id: str) -> asyncio.Lock: ...


@dataclass(frozen=True)
class MountWish:
    """One attachment asked for, before its volume is resolved: a create's entry or an attach."""

    volume: str  # id, name or unique prefix
    mount_path: str
    readonly: bool
    overlay: bool
    overlay_size: str | None


# ---- the pure rules ------------------------------------------------------------------------------


def normalize_mount_path(text: str) -> str:
    """An absolute, normalized guest path that is not a system directory, or 400."""
    if not text.startswith("/"):
        raise BadRequest(f"mount_path {text!r} must be an absolute path", code="invalid_mount_path")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise BadRequest("mount_path must not contain control characters", code="invalid_mount_path")
    if len(text.encode()) > MAX_MOUNT_PATH:
        raise BadRequest(f"mount_path is longer than {MAX_MOUNT_PATH} bytes", code="invalid_mount_path")
    path = "/" + posixpath.normpath(text).lstrip("/")
    if path == "/":
        raise BadRequest("mount_path must not be / (the guest's root)", code="invalid_mount_path")
    for system in SYSTEM_DIRECTORIES:
        if path == system or path.startswith(system + "/"):
            raise BadRequest(
                f"mount_path {path} is a system directory ({system} holds the image's or the "
                "guest's own files); choose another, such as /data or /mnt/...",
                code="invalid_mount_path",
            )
    return path


def max_volume_devices(board: Board) -> int:
    return min(REFERENCE_MAX_VOLUME_DEVICES, free_virtio_slots(board))


def devices_of(mounts: Iterable[VolumeMountRecord]) -> int:
    """Virtio devices the volumes take: an overlay volume's base and its upper disk."""
    return sum(2 if mount.overlay else 1 for mount in mounts)


def overlay_bytes(wish: MountWish) -> int:
    """The upper disk's size of an overlay wish (0 for a plain one), checked (400)."""
    if not wish.overlay:
        if wish.overlay_size is not None:
            raise BadRequest("overlay_size is given only with overlay=true", code="invalid_volume_mount")
        return 0
    if not wish.readonly:
        raise BadRequest(
            "overlay=true requires readonly=true: the volume is the read-only base, writes go to "
            "the instance's own overlay",
            code="invalid_volume_mount",
        )
    if not wish.overlay_size:
        raise BadRequest("overlay=true requires an overlay_size", code="invalid_volume_mount")
    try:
        size = round_up(parse_size(wish.overlay_size), SIZE_GRANULE)
    except UnitError as exc:
        raise BadRequest(f"overlay_size: {exc}", code="invalid_volume_mount") from None
    if not MIN_VOLUME_OVERLAY <= size <= MAX_VOLUME_OVERLAY:
        raise BadRequest(
            f"overlay_size must be between {format_size(MIN_VOLUME_OVERLAY)} and "
            f"{format_size(MAX_VOLUME_OVERLAY)}",
            code="invalid_volume_mount",
        )
    return size


def plan_mount(
    wish: MountWish, volume_id: str, existing: Sequence[VolumeMountRecord], board: Board
) -> VolumeMountRecord:
    """Pure: the attachment ``wish`` makes next to ``existing`` (the instance's others), or 400
    (path, overlay, device count) / 409 (the volume is already attached to this instance)."""
    mount_path = normalize_mount_path(wish.mount_path)
    size = overlay_bytes(wish)
    for other in existing:
        if other.volume_id == volume_id:
            raise Conflict(
                f"volume {volume_id} is already attached to this instance at {other.mount_path}",
                code="already_attached",
            )
        if other.mount_path == mount_path:
            raise BadRequest(
                f"mount_path {mount_path} is used twice (volume {other.volume_id} is mounted there)",
                code="invalid_mount_path",
            )
    mount = VolumeMountRecord(
        volume_id=volume_id, mount_path=mount_path, readonly=wish.readonly, overlay=wish.overlay,
        overlay_bytes=size,
    )
    limit = max_volume_devices(board)
    needed = devices_of([*existing, mount])
    if needed > limit:
        raise BadRequest(
            f"too many volumes: they need {needed} disk devices (an overlay volume takes 2) and "
            f"{board.value} carries at most {limit}",
            code="too_many_volumes",
        )
    return mount


def check_sharing(volume: VolumeRef, readonly: bool, others: Sequence[VolumeAttachment]) -> None:
    """Pure: any number of read-only attachments, or exactly one read-write one (409)."""
    label = f"volume {volume.name} ({volume.id})"
    if not readonly and others:
        holders = ", ".join(sorted({a.instance_id for a in others}))
        raise Conflict(
            f"{label} is already attached to instance(s) {holders}: a read-write attachment must "
            "be its only one (attach it read-only, or detach it there first)",
            code="already_attached",
        )
    writers = [a.instance_id for a in others if not a.readonly]
    if writers:
        raise Conflict(
            f"{label} is already attached read-write to instance {writers[0]}: it cannot be shared "
            "until that attachment is gone",
            code="already_attached",
        )


def require_readonly(name: str, mounts: Sequence[VolumeMountRecord], what: str) -> None:
    """Snapshots and forks only of instances whose every attachment is read-only (409)."""
    writable = [mount for mount in mounts if not mount.readonly]
    if writable:
        paths = ", ".join(f"{m.volume_id} at {m.mount_path}" for m in writable)
        raise Conflict(
            f"{what} of instance {name} requires read-only volume attachments; it has a "
            f"read-write one ({paths}): stop it and detach, or attach read-only",
            code="volume_not_readonly",
        )


def view(mounts: Sequence[VolumeMountRecord]) -> list[VolumeMount]:
    return [
        VolumeMount(
            volume_id=m.volume_id,
            mount_path=m.mount_path,
            readonly=m.readonly,
            overlay=m.overlay,
            overlay_size=format_size(m.overlay_bytes) if m.overlay else None,
        )
        for m in mounts
    ]


# ---- the disks of a boot -------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeDisks:
    """What a boot gives the VM for its volumes: drives (in order) and the guest's mount list."""

    disks: tuple[DiskConfig, ...] = ()
    guest: tuple[GuestVolume, ...] = ()
    uppers: tuple[tuple[Path, int], ...] = ()  # overlay upper disks to make if missing, with sizes


def volume_disks(
    mounts: Sequence[VolumeMountRecord], paths: InstancePaths, disk_path: VolumeDiskPath
) -> VolumeDisks:
    disks: list[DiskConfig] = []
    guest: list[GuestVolume] = []
    uppers: list[tuple[Path, int]] = []
    for index, mount in enumerate(mounts):
        serial = VOLUME_SERIAL.format(index=index)
        disks.append(DiskConfig(path=disk_path(mount.volume_id), readonly=mount.readonly, serial=serial))
        upper_serial = None
        if mount.overlay:
            upper_serial = UPPER_SERIAL.format(index=index)
            upper = paths.volume_overlay(mount.volume_id)
            disks.append(DiskConfig(path=upper, serial=upper_serial))
            uppers.append((upper, mount.overlay_bytes))
        mode = VolumeMode.OVERLAY if mount.overlay else VolumeMode.RO if mount.readonly else VolumeMode.RW
        guest.append(GuestVolume(mode=mode, serial=serial, upper_serial=upper_serial, path=mount.mount_path))
    return VolumeDisks(disks=tuple(disks), guest=tuple(guest), uppers=tuple(uppers))


class VolumeDiskPath(Protocol):
    def __call__(self, volume_id: str) -> Path: ...


# ---- attachments across instances -------------------------------------------------------------


class Attachments:
    """Every attachment the server knows: those in the records of the table, plus those of
    creates, forks and restores in flight (reserved under the volumes' locks)."""

    def __init__(self, table: InstanceTable) -> None:
        self._table = table
        self._pending: dict[str, list[VolumeMountRecord]] = {}  # by instance id
        self.catalog: VolumeCatalog | None = None

    def require_catalog(self) -> VolumeCatalog:
        if self.catalog is None:
            raise Conflict("this server has no volume service", code="not_supported")
        return self.catalog

    def attachments_of(self, volume_id: str, *, excluding: str | None = None) -> list[VolumeAttachment]:
        """Synchronous, from memory: the volume's attachments (``excluding`` one instance's)."""
        found: list[VolumeAttachment] = []
        seen: set[tuple[str, str]] = set()
        holders = [(live.id, live.record.volumes) for live in self._table if not live.deleted]
        holders += list(self._pending.items())
        for instance_id, mounts in holders:
            if instance_id == excluding:
                continue
            for mount in mounts:
                if mount.volume_id == volume_id and (instance_id, mount.mount_path) not in seen:
                    seen.add((instance_id, mount.mount_path))
                    found.append(
                        VolumeAttachment(
                            instance_id=instance_id, mount_path=mount.mount_path, readonly=mount.readonly
                        )
                    )
        return found

    @contextlib.asynccontextmanager
    async def locked(self, volume_ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold the volumes' locks (in id order: no two holders wait on each other)."""
        catalog = self.require_catalog()
        async with contextlib.AsyncExitStack() as stack:
            for volume_id in sorted(set(volume_ids)):
                await stack.enter_async_context(catalog.lock(volume_id))
            yield

    def resolve(self, ref: str) -> VolumeRef:
        return self.require_catalog().resolve(ref)

    def check_shareable(self, mounts: Sequence[VolumeMountRecord], instance_id: str) -> None:
        """Under the volumes' locks: each of ``mounts`` may be attached by ``instance_id`` next
        to every other instance's attachments (409 otherwise; 404 for a volume that is gone)."""
        catalog = self.require_catalog()
        for mount in mounts:
            volume = catalog.resolve(mount.volume_id)
            check_sharing(volume, mount.readonly, self.attachments_of(mount.volume_id, excluding=instance_id))

    @contextlib.asynccontextmanager
    async def claim(self, instance_id: str, mounts: Sequence[VolumeMountRecord]) -> AsyncIterator[None]:
        """Check ``mounts`` against every other attachment and reserve them, in one step under the
        volumes' locks; the reservation lasts while the block runs."""
        if not mounts:
            yield
            return
        async with self.locked(m.volume_id for m in mounts):
            self.check_shareable(mounts, instance_id)
            self._pending[instance_id] = list(mounts)
        try:
            yield
        finally:
            self._pending.pop(instance_id, None)
