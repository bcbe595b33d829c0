"""The link to each instance's guest agent: made when first needed, closed when the VMM goes.

After a restore the guest's wall clock stood still while it slept: it is set before anyone gets
the agent. A fork's new identity (randomness, MAC, hostname) is given through it too.

A restore links the agent while QEMU loads the saved state (``dial_restoring``): the HELLO is
waiting in the socket when the guest runs again, so the link and the clock are done by the time
the restore answers ``Running`` (``adopt_restored``), and a first exec goes straight through.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from hypemand.errors import DomainError, InvalidState
from hypemand.guest.client import AgentClient, AgentError
from hypemand.guest.config_disk import GuestNetwork
from hypemand.hypervisor.base import VMPaths
from hypemand.instances.live import LiveInstance

log = logging.getLogger(__name__)

AGENT_CONNECT_TIMEOUT = 10.0


class AgentLinks:
    async def agent(self, live: LiveInstance) -> AgentClient:
        """The instance's agent connection, with the guest's clock set if it was restored."""
        async with live.agent_lock:
            agent = await self._connected(live)
            if live.clock_stale:
                await agent.set_clock()
                live.clock_stale = False
            return agent

    async def _connected(self, live: LiveInstance) -> AgentClient:
        if live.agent is not None and live.agent.connected:
            return live.agent
        handle = live.handle
        if handle is None or not handle.is_alive():
            raise InvalidState(f"instance {live.name} is Stopped, not Running")
        if live.agent is not None:
            await live.agent.close()
            live.agent = None
        try:
            live.agent = await AgentClient.connect(handle.agent_socket_path, timeout=AGENT_CONNECT_TIMEOUT)
        except AgentError as exc:
            if not handle.is_alive():
                raise InvalidState(f"instance {live.name} is Stopped, not Running") from exc
            raise
        return live.agent

    async def close(self, live: LiveInstance) -> None:
        agent, live.agent = live.agent, None
        if agent is not None:
            await agent.close()

    def dial_restoring(self, live: LiveInstance, vm_directory: Path) -> asyncio.Task[AgentClient] | None:
        """Start linking the agent of a VM about to be restored from ``vm_directory``: dial its
        socket as soon as QEMU creates it and say HELLO, so the guest finds the HELLO waiting
        when it runs again. None for a VM without an agent. Hand the task to
        ``adopt_restored``, or to ``abandon`` if the restore fails."""
        if live.record.skip_guest_agent:
            return None
        socket_path = VMPaths(vm_directory).agent_socket
        return asyncio.ensure_future(AgentClient.connect(socket_path, timeout=AGENT_CONNECT_TIMEOUT))

    async def abandon(self, linking: asyncio.Task[AgentClient] | None) -> None:
        """Drop a link ``dial_restoring`` started (the restore failed)."""
        if linking is None:
            return
        linking.cancel()
        (outcome,) = await asyncio.gather(linking, return_exceptions=True)
        if isinstance(outcome, AgentClient):
            await outcome.close()

    async def adopt_restored(self, live: LiveInstance, linking: asyncio.Task[AgentClient] | None) -> bool:
        """Make the link ``dial_restoring`` started the instance's agent once the guest has
        answered, and set the guest's clock; True when both are done. Bounded: a guest whose
        agent does not answer still runs; the next use of the agent links it (and sets the
        clock) anew."""
        if linking is None:
            return False
        async with live.agent_lock:
            try:
                async with asyncio.timeout(AGENT_CONNECT_TIMEOUT):
                    agent = await linking
                    previous, live.agent = live.agent, agent
                    if previous is not None:
                        await previous.close()
                    if live.clock_stale:
                        await agent.set_clock()
                        live.clock_stale = False
                    return True
            except (DomainError, TimeoutError, OSError) as exc:
                log.warning("instance %s: the agent did not answer after the restore: %s", live.id, exc)
                linked = linking.done() and not linking.cancelled() and linking.exception() is None
                if linked and live.agent is linking.result():
                    live.agent = None
                await self.abandon(linking)
                return False

    async def give_identity(self, live: LiveInstance, network: GuestNetwork | None) -> None:
        """A fork resumed another VM's memory: fresh kernel randomness, the fork's MAC on its NIC,
        its own address on the bridge network (``network``; None keeps the guest's, as under
        user-mode networking where every guest has the same) and its name as hostname."""
        if live.record.skip_guest_agent:
            return
        try:
            async with asyncio.timeout(AGENT_CONNECT_TIMEOUT * 3):
                agent = await self.agent(live)
                await agent.set_identity(
                    os.urandom(64),
                    mac=live.record.mac if live.record.network_enabled else None,
                    hostname=live.record.name,
                    network=network if live.record.ip is not None else None,
                )
        except TimeoutError:
            raise InvalidState(
                f"instance {live.name}: the fork's guest agent did not answer, so it has no identity of "
                f"its own (randomness, MAC, address, hostname) yet"
            ) from None

    async def network_counters(self, live: LiveInstance) -> tuple[int, int]:
        """Bytes the guest's NIC received and sent (user-mode networking has no host TAP to
        read). The caller has checked that the instance is Running."""
        if not live.record.network_enabled:
            return 0, 0
        try:
            agent = await self.agent(live)
            async with asyncio.timeout(2.0):
                rx = await agent.read_file("/sys/class/net/eth0/statistics/rx_bytes")
                tx = await agent.read_file("/sys/class/net/eth0/statistics/tx_bytes")
            return int(rx.strip() or 0), int(tx.strip() or 0)
        except (DomainError, TimeoutError, ValueError) as exc:
            log.debug("instance %s: no network counters: %s", live.id, exc)
            return 0, 0
