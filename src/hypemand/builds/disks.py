"""The disks a builder VM mounts, offered to the instance manager as volumes.

A builder VM is an ordinary instance (``InstanceManager.create``), and an instance mounts disks
through the volume catalog. :class:`BuildVolumes` wraps the server's ``VolumeService`` and adds
two kinds of disk that are not volumes of the API (they never appear in ``/volumes``):

* ``build:source:<build id>``: the build's read-only source disk (context, Dockerfile, bases);
* ``build:cache:builder:<builder id>`` / ``build:cache:<build id>``: the layer store the build
  writes: its builder's persistent cache disk, or a scratch disk of its own.

The ``:`` keeps these names apart from every volume id and name (neither may hold one). A build
disk resolves only while the build service has *granted* it, that is while its build's VM is
being made: a client cannot mount another build's source or cache by guessing its name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from hypemand.errors import NotFound
from hypemand.instances.volumes import VolumeCatalog, VolumeRef

PREFIX = "build:"


def source_ref(build_id: str) -> str:
    return f"{PREFIX}source:{build_id}"


def cache_ref(build_id: str, builder_id: str | None) -> str:
    """Named by the disk: a builder's cache has one name whichever build mounts it, so a VM of an
    earlier build still holding it makes the next one's attach a conflict, never a second
    writer."""
    return f"{PREFIX}cache:builder:{builder_id}" if builder_id else f"{PREFIX}cache:{build_id}"


@dataclass(frozen=True)
class BuildDisk:
    id: str
    name: str


class BuildVolumes:
    """A ``VolumeCatalog``: the server's volumes plus the build disks granted right now."""

    def __init__(self, volumes: VolumeCatalog) -> None:
        self._volumes = volumes
        self._granted: dict[str, Path] = {}
        self._paths: dict[str, Path] = {}  # every build disk handed out since the start
        self._locks: dict[str, asyncio.Lock] = {}

    def grant(self, ref: str, disk: Path) -> None:
        self._granted[ref] = disk
        self._paths[ref] = disk

    def revoke(self, ref: str) -> None:
        self._granted.pop(ref, None)

    def resolve(self, ref: str) -> VolumeRef:
        if ref.startswith(PREFIX):
            if ref not in self._granted:
                raise NotFound(f"volume {ref!r} not found")
            return BuildDisk(id=ref, name=ref)
        return self._volumes.resolve(ref)

    def disk_path(self, volume_id: str) -> Path:
        if volume_id.startswith(PREFIX):
            # A builder VM left by a killed server is deleted at the next start without its disk
            # being asked for; a path that is no longer granted is the disk as it was.
            if volume_id in self._paths:
                return self._paths[volume_id]
            raise NotFound(f"volume {volume_id!r} not found")
        return self._volumes.disk_path(volume_id)

    def lock(self, volume_id: str) -> asyncio.Lock:
        if volume_id.startswith(PREFIX):
            return self._locks.setdefault(volume_id, asyncio.Lock())
        return self._volumes.lock(volume_id)
