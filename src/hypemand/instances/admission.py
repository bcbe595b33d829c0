"""Admission: names are unique, and the host is not promised more than it has.

vCPUs are oversubscribed 4x, memory not at all (see ``host.py``), counted over instances whose
VMM runs plus boots in flight. A create, start, restore or fork beyond that is refused (409
``insufficient_resources``) before anything is made. Decisions are taken one at a time under one
lock; a boot in flight stays counted until its VMM runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from hypemand.errors import Conflict
from hypemand.instances.host import HostCapacity
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.units import format_size


@dataclass(frozen=True)
class Demand:
    """What one instance holds while its VMM runs."""

    vcpus: int
    memory: int
    image_digest: str


def check_capacity(capacity: HostCapacity, held: Iterable[Demand], wanted: Demand) -> None:
    """Pure: refuse ``wanted`` if, on top of ``held``, it exceeds the host's limits."""
    held = list(held)
    used_cpu = sum(demand.vcpus for demand in held)
    used_mem = sum(demand.memory for demand in held)
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


def demand_of(live: LiveInstance) -> Demand:
    record = live.record
    return Demand(record.vcpus, record.memory_bytes + record.hotplug_bytes, record.image_digest)


class Admission:
    def __init__(self, table: InstanceTable, capacity: Callable[[], HostCapacity]) -> None:
        self._table = table
        self._capacity = capacity
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
            if demand is not None:
                self._check(demand)
                self._pending[instance_id] = demand
            self._names.add(name)
        try:
            yield
        finally:
            self._names.discard(name)
            self._pending.pop(instance_id, None)

    @contextlib.asynccontextmanager
    async def boot(self, live: LiveInstance) -> AsyncIterator[None]:
        """An existing instance about to hold host resources again (start, restore): admitted,
        and counted as pending until its VMM runs, so concurrent boots cannot overcommit."""
        demand = demand_of(live)
        async with self._lock:
            self._check(demand, excluding=live.id)
            self._pending[live.id] = demand
        try:
            yield
        finally:
            self._pending.pop(live.id, None)

    def _check(self, wanted: Demand, *, excluding: str | None = None) -> None:
        held = [demand for key, demand in self._pending.items() if key != excluding]
        held += [demand_of(live) for live in self._table if live.id != excluding and live.vmm_alive()]
        check_capacity(self._capacity(), held, wanted)
