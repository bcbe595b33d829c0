"""The server's in-memory side of each instance, and the table of them.

A :class:`LiveInstance` holds the record last written and what only a running server has (the
VMM handle, the console scanner, the agent link, the watcher, a short-lived status answer). The
collaborators of the instance manager share these objects: the VMM fields change only in
``lifecycle`` and ``saved`` (under the instance's lock), the status cache in ``state``, the agent
link in ``agents``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from hypemand.errors import Conflict, NotFound
from hypemand.guest.client import AgentClient
from hypemand.hypervisor.base import VMHandle, VMStatus
from hypemand.instances.console import ConsoleScanner
from hypemand.instances.models import InstanceRecord
from hypemand.layout import InstancePaths
from hypemand.policies.models import InstanceHealthStatus


@dataclass
class LiveInstance:
    record: InstanceRecord
    paths: InstancePaths
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one mutation at a time
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one record write at a time
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one agent (re)connect at a time
    handle: VMHandle | None = None
    scanner: ConsoleScanner | None = None
    agent: AgentClient | None = None
    watcher: asyncio.Task[None] | None = None
    status_probe: asyncio.Task[VMStatus] | None = None
    status_value: VMStatus | None = None
    status_at: float = 0.0
    status_of: VMHandle | None = None  # the VMM the probe and the cached answer are about
    deleted: bool = False
    clock_stale: bool = False  # restored: set the guest's clock before the agent is handed out
    exit_seen_at: datetime | None = None  # when a read first found the VMM gone, before the watcher
    # What the health monitor saw last (hypemand/policies); None: not checked by this server yet.
    health: InstanceHealthStatus | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    def vmm_alive(self) -> bool:
        return self.handle is not None and self.handle.is_alive()

    def forget_status(self) -> None:
        """The VMM changed (launched, paused, ended): the next read asks QEMU afresh."""
        self.status_value = None
        self.status_probe = None
        self.status_of = None


class InstanceTable:
    """Every instance the server knows, by id; references resolved the reference's way."""

    def __init__(self) -> None:
        self._by_id: dict[str, LiveInstance] = {}

    def __iter__(self) -> Iterator[LiveInstance]:
        # A copy: callers may await between items while the table changes.
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, live: LiveInstance) -> None:
        self._by_id[live.id] = live

    def pop(self, instance_id: str) -> LiveInstance | None:
        return self._by_id.pop(instance_id, None)

    def get(self, instance_id: str) -> LiveInstance | None:
        return self._by_id.get(instance_id)

    def has_name(self, name: str) -> bool:
        return any(live.name == name for live in self._by_id.values())

    def resolve(self, ref: str) -> LiveInstance:
        """By id, then exact name, then unique id prefix."""
        if live := self._by_id.get(ref):
            return live
        named = [live for live in self._by_id.values() if live.name == ref]
        if len(named) == 1:
            return named[0]
        prefixed = [live for id_, live in self._by_id.items() if ref and id_.startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise Conflict("multiple resources match, use full ID", code="ambiguous")
        raise NotFound(f"instance {ref!r} not found")


@contextlib.asynccontextmanager
async def mutating(live: LiveInstance) -> AsyncIterator[None]:
    """Hold the instance's lock for a change. An operation that waited for the lock behind a
    delete finds the instance gone: 404, and nothing written or started."""
    async with live.lock:
        if live.deleted:
            raise NotFound(f"instance {live.name!r} was deleted")
        yield
