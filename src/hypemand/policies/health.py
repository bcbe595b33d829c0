"""The health monitor: probes every VM whose instance has a health check, while the VM runs.

One small task per probed VM (a *prober*), tied to that VM's life: the VMM handle and the
check it was started for. A new boot, a restore (a new VMM), a PATCH of the check, or the VM's
end retires the prober and forgets what it saw; the next one starts afresh (``starting``, with
the start period counted from the boot's ``started_at``). A reconcile pass, woken by the
instance events and run every second besides, starts and retires probers from what the
instances are now, so a server that starts with running VMs probes them without any event.

A probe runs only while the instance's record says it runs (``phase == running``: the program
started and its agent answered) and no operation holds the instance (a standby, a snapshot or
a stop pauses or ends the VM: what a probe would see then says nothing about the program). Each
probe is bounded by the check's timeout and waits on the event loop without a thread, so a VM
that never answers costs its own prober only. What it saw is ``LiveInstance.health`` (shown as
``health_status``); health never changes the lifecycle state. When a VM becomes ``unhealthy``
the listeners (the restart supervisor) are told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from hypemand.guest.client import AgentClient
from hypemand.hypervisor.base import VMHandle
from hypemand.instances.events import InstanceEvent
from hypemand.instances.live import LiveInstance
from hypemand.instances.manager import InstanceManager
from hypemand.instances.networking import holds_address
from hypemand.instances.records import utcnow
from hypemand.policies.health_state import HealthTracker, ProbeOutcome
from hypemand.policies.models import HealthCheck, seconds
from hypemand.policies.probes import ProbeTarget, probe

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 1.0  # a PATCHed check or a VM adopted without an event is seen within this

UnhealthyListener = Callable[[LiveInstance], None]


@dataclass
class _Prober:
    handle: VMHandle
    check: HealthCheck
    task: asyncio.Task[None]


class HealthMonitor:
    def __init__(self, instances: InstanceManager) -> None:
        self.instances = instances
        self._probers: dict[str, _Prober] = {}
        self._listeners: list[UnhealthyListener] = []
        self._wake = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        instances.events.subscribe(self._on_event)

    def on_unhealthy(self, listener: UnhealthyListener) -> None:
        """``listener(live)`` runs on the event loop when an instance turns ``unhealthy``; it
        must not block or raise."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="health-monitor")

    async def stop(self) -> None:
        tasks = [prober.task for prober in self._probers.values()]
        if self._reconciler is not None:
            tasks.append(self._reconciler)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probers.clear()

    # ---- which VMs are probed ---------------------------------------------------------------

    def _on_event(self, event: InstanceEvent) -> None:
        """Every event is a new life or the end of one: what was seen of the last is gone."""
        self._retire(event.instance_id)
        self._wake.set()

    def _retire(self, instance_id: str) -> None:
        prober = self._probers.pop(instance_id, None)
        if prober is not None:
            prober.task.cancel()
        live = self.instances.table.get(instance_id)
        if live is not None:
            live.health = None

    async def _reconcile_forever(self) -> None:
        while True:
            self._wake.clear()
            self.reconcile()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_INTERVAL):
                    await self._wake.wait()

    def reconcile(self) -> None:
        """Start a prober for each running VM with a check, retire the others."""
        seen = set()
        for live in self.instances.table:
            seen.add(live.id)
            check = live.record.health_check
            handle = live.handle
            wanted = check is not None and check.enabled and handle is not None and not live.deleted
            prober = self._probers.get(live.id)
            if prober is not None and (
                not wanted or prober.handle is not handle or prober.check is not check or prober.task.done()
            ):
                self._retire(live.id)
                prober = None
            if wanted and prober is None:
                assert check is not None and handle is not None
                task = asyncio.create_task(self._probe_forever(live, handle, check), name=f"health-{live.id}")
                self._probers[live.id] = _Prober(handle, check, task)
        for gone in set(self._probers) - seen:
            self._retire(gone)

    # ---- one VM -----------------------------------------------------------------------------

    async def _probe_forever(self, live: LiveInstance, handle: VMHandle, check: HealthCheck) -> None:
        tracker = HealthTracker(check, live.record.started_at or utcnow())
        interval = seconds(check.interval)
        loop = asyncio.get_running_loop()
        due = loop.time()
        while live.handle is handle and live.record.health_check is check:
            if live.record.phase == "running" and not live.lock.locked() and handle.is_alive():
                try:
                    outcome = await self._probe_once(live, check)
                except Exception as exc:  # a bug of ours must not end the VM's monitoring
                    log.exception("instance %s: health probe failed", live.id)
                    outcome = ProbeOutcome(False, f"internal error: {exc}")
                if live.handle is not handle or live.record.health_check is not check:
                    return
                before = tracker.status.status
                live.health = tracker.observe(outcome, utcnow())
                if live.health.status != before:
                    log.info("instance %s (%s): health %s -> %s%s", live.name, live.id, before,
                             live.health.status, f" ({live.health.last_error})" if not outcome.ok else "")
                if live.health.status == "unhealthy" and before != "unhealthy":
                    self._tell_unhealthy(live)
            due += interval
            now = loop.time()
            if due < now:  # a probe (or the machine) was slower than the interval: no catching up
                due = now + interval
            await asyncio.sleep(due - now)

    def _tell_unhealthy(self, live: LiveInstance) -> None:
        for listener in list(self._listeners):
            try:
                listener(live)
            except Exception:
                log.exception("instance %s: unhealthy listener failed", live.id)

    async def _probe_once(self, live: LiveInstance, check: HealthCheck) -> ProbeOutcome:
        if check.type == "exec":
            if live.record.skip_guest_agent:
                return await probe(check, ProbeTarget(None, None), None,
                                   "the instance runs without a guest agent (skip_guest_agent)")

            async def agent_of() -> AgentClient:
                return await self.instances.agents.agent(live)

            return await probe(check, ProbeTarget(None, None), agent_of)
        return await probe(check, self._target(live), None)

    def _target(self, live: LiveInstance) -> ProbeTarget:
        network = self.instances.network
        if not live.record.network_enabled:
            return ProbeTarget(None, None, "the instance has no network (network.enabled is false), "
                                           "so there is no address to probe")
        if network.host is None:
            return ProbeTarget(None, None, (
                "the server runs QEMU's user-mode networking "
                f"({network.user_mode_reason or 'no bridge network'}): the VM has no address the "
                "server can reach; use an exec check"))
        ip = live.record.ip if holds_address(live) else None
        return ProbeTarget(ip, network.host, None if ip else "the VM holds no address now")
