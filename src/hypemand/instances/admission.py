"""Admission: names are unique, and the host is not promised more than it has.

vCPUs are oversubscribed 4x, memory and disk not at all (see ``host.py``). CPU and memory are
counted over instances whose VMM runs plus boots in flight. Disk is counted as promises still
open: every instance's overlays (root and volume overlays) may grow to their full size and a
VM's RAM file must be backed in full, so the free space must cover what those may still take
plus what the new one asks for. A create, start or restore beyond that is refused (409
``insufficient_resources``) before anything is made; a fork is admitted when it is brought up
(after its disks are copied, which its failure removes again). Decisions are taken one at a
time under one lock; a boot in flight stays counted until its VMM runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hypemand.errors import Conflict
from hypemand.instances.host import HostCapacity
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.units import format_size


@dataclass(frozen=True)
class Demand:
    """What one instance holds: vCPUs and memory while its VMM runs, ``disk`` bytes it may still
    write that are not allocated yet."""

    vcpus: int
    memory: int
    image_digest: str
    disk: int = 0


def check_capacity(capacity: HostCapacity, held: Iterable[Demand], wanted: Demand) -> None:
    """Pure: refuse ``wanted`` if, on top of ``held``, it exceeds the host's limits. CPU and
    memory ``held`` are those of running VMMs; disk ``held`` is every instance's open promise."""
    held = list(held)
    used_cpu = sum(demand.vcpus for demand in held)
    used_mem = sum(demand.memory for demand in held)
    promised_disk = sum(demand.disk for demand in held)
    if used_cpu + wanted.vcpus > capacity.cpu_limit:
        raise Conflict(
            f"insufficient resources: {wanted.vcpus} vCPUs requested, "
            f"{max(0, capacity.cpu_limit - used_cpu)} of {capacity.cpu_limit} available",
            code="insufficient_resources",
        )
    if used_mem + wanted.memory > capacity.memory_limit:
        raise Conflict(
            f"insufficient resources: {format_size(wanted.memory)} memory requested, "
            f"{format_size(max(0, capacity.memory_limit - used_mem))} available",
            code="insufficient_resources",
        )
    if promised_disk + wanted.disk > capacity.disk_free_bytes:
        raise Conflict(
            f"insufficient resources: {format_size(wanted.disk)} disk requested, "
            f"{format_size(max(0, capacity.disk_free_bytes - promised_disk))} available "
            f"({format_size(capacity.disk_free_bytes)} free, {format_size(promised_disk)} of it "
            "promised to existing instances' overlays and memory)",
            code="insufficient_resources",
        )


def _allocated(path: Path) -> int:
    """Bytes allocated to a file (0 if it does not exist)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def open_disk_promise(
    overlay: Path, overlay_bytes: int, memory_file: Path | None, memory_bytes: int
) -> int:
    """Blocking (two stats): what an instance may still write beyond what it has allocated.

    ``memory_file`` is given when the instance writes a RAM file of its own, now or at its next
    boot (not a fork, which maps a shared file privately and never writes it)."""
    overlay_used = _allocated(overlay)
    promise = max(0, overlay_bytes - overlay_used)
    if memory_file is not None:
        promise += max(0, memory_bytes - _allocated(memory_file))
    return promise


@dataclass(frozen=True)
class DiskClaim:
    """What an instance may still take on the data disk, by the one rule admission and
    ``/resources`` share."""

    overlay: Path
    overlay_bytes: int
    memory_file: Path
    memory_bytes: int
    standby_record: Path
    # Overlay volumes' private upper disks (path, size): they may grow to their size too.
    volume_overlays: tuple[tuple[Path, int], ...] = ()

    @property
    def overlays_bytes(self) -> int:
        """What the instance's overlays (root and volumes') may grow to."""
        return self.overlay_bytes + sum(size for _, size in self.volume_overlays)

    def open_promise(self, *, running: bool, writes_memory_file: Callable[[Path], bool]) -> int:
        """Blocking. A RAM file counts while the VM runs or is in Standby, and only if it is the
        VM's own (reserved in full)."""
        holds_memory = running or self.standby_record.exists()
        own = holds_memory and writes_memory_file(self.overlay.parent)
        promise = open_disk_promise(
            self.overlay, self.overlay_bytes, self.memory_file if own else None, self.memory_bytes
        )
        return promise + sum(max(0, size - _allocated(path)) for path, size in self.volume_overlays)


def claim_of(live: LiveInstance) -> DiskClaim:
    record = live.record
    return DiskClaim(
        overlay=live.paths.overlay_disk,
        overlay_bytes=record.overlay_bytes,
        memory_file=live.paths.memory_file,
        memory_bytes=record.memory_bytes + record.hotplug_bytes,
        standby_record=live.paths.standby_record,
        volume_overlays=tuple(
            (live.paths.volume_overlay(mount.volume_id), mount.overlay_bytes)
            for mount in record.volumes
            if mount.overlay
        ),
    )


class Admission:
    def __init__(
        self,
        table: InstanceTable,
        capacity: Callable[[], HostCapacity],
        writes_memory_file: Callable[[Path], bool],
    ) -> None:
        self._table = table
        self._capacity = capacity
        self._writes_memory_file = writes_memory_file
        self._lock = asyncio.Lock()
        self._names: set[str] = set()  # names of creates and forks in flight
        self._pending: dict[str, Demand] = {}  # boots in flight, by instance id

    def image_in_use(self, digest: str) -> bool:
        return any(live.record.image_digest == digest for live in self._table) or any(
            demand.image_digest == digest for demand in self._pending.values()
        )

    @contextlib.asynccontextmanager
    async def new_instance(self, instance_id: str, name: str, demand: Demand | None) -> AsyncIterator[None]:
        """A create (``demand`` given: it will boot) or a fork (None: it is admitted when it is
        brought up) holds its name, and its resources, until it is in the table or gone."""
        async with self._lock:
            if name in self._names or self._table.has_name(name):
                raise Conflict(f"an instance named {name!r} already exists", code="name_conflict")
            self._names.add(name)
            try:
                if demand is not None:
                    # Its image counts as in use from now on, also while the check awaits.
                    self._pending[instance_id] = demand
                    await self._check(demand, excluding=instance_id)
            except BaseException:
                self._names.discard(name)
                self._pending.pop(instance_id, None)
                raise
        try:
            yield
        finally:
            self._names.discard(name)
            self._pending.pop(instance_id, None)

    @contextlib.asynccontextmanager
    async def boot(self, live: LiveInstance) -> AsyncIterator[None]:
        """An existing instance about to hold host resources again (start, restore): admitted,
        and counted as pending until its VMM runs, so concurrent boots cannot overcommit."""
        async with self._lock:
            demand = await asyncio.to_thread(self._demand, live, True)
            await self._check(demand, excluding=live.id)
            self._pending[live.id] = demand
        try:
            yield
        finally:
            self._pending.pop(live.id, None)

    async def _check(self, wanted: Demand, *, excluding: str | None = None) -> None:
        pending = [demand for key, demand in self._pending.items() if key != excluding]
        others = [
            (live, live.vmm_alive())
            for live in self._table
            if live.id != excluding and live.id not in self._pending
        ]
        capacity, held = await asyncio.to_thread(self._held, others)
        check_capacity(capacity, pending + held, wanted)

    def _held(self, others: list[tuple[LiveInstance, bool]]) -> tuple[HostCapacity, list[Demand]]:
        """Blocking: the host's capacity now, and what every other instance holds. CPU and
        memory count only where a VMM runs; disk promises count for every instance (a RAM file
        for those running or in Standby)."""
        held = []
        for live, running in others:
            demand = self._demand(live, running)
            held.append(demand if running else Demand(0, 0, demand.image_digest, demand.disk))
        return self._capacity(), held

    def _demand(self, live: LiveInstance, running: bool) -> Demand:
        """Blocking (stats the instance's disks). ``running``: it holds, or is about to hold,
        a VMM and so its RAM file."""
        record = live.record
        disk = claim_of(live).open_promise(running=running, writes_memory_file=self._writes_memory_file)
        return Demand(record.vcpus, record.memory_bytes + record.hotplug_bytes, record.image_digest, disk)
