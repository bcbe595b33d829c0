"""The link to each instance's guest agent: made when first needed, closed when the VMM goes.

After a restore the guest's wall clock stood still while it slept: it is set before anyone gets
the agent. A fork's new identity (randomness, MAC, hostname) is given through it too.
"""

from __future__ import annotations

import asyncio
import logging
import os

from hypemand.errors import DomainError, InvalidState
from hypemand.guest.client import AgentClient, AgentError
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
        reconnect, live.reconnect = live.reconnect, None
        if reconnect is not None and reconnect is not asyncio.current_task():
            # A reconnect after a restore must not finish after the VM it connects to is gone.
            reconnect.cancel()
            await asyncio.gather(reconnect, return_exceptions=True)
        agent, live.agent = live.agent, None
        if agent is not None:
            await agent.close()

    async def reconnect_after_restore(self, live: LiveInstance) -> None:
        """Reconnect the agent (which sets the clock) now rather than at the first exec."""
        if live.record.skip_guest_agent:
            return
        try:
            async with asyncio.timeout(AGENT_CONNECT_TIMEOUT):
                await self.agent(live)
        except (DomainError, TimeoutError) as exc:
            log.warning("instance %s: could not set the clock after restore: %s", live.id, exc)

    async def give_identity(self, live: LiveInstance) -> None:
        """A fork resumed another VM's memory: fresh kernel randomness, the fork's MAC on its NIC
        and its name as hostname."""
        if live.record.skip_guest_agent:
            return
        async with asyncio.timeout(AGENT_CONNECT_TIMEOUT * 3):
            agent = await self.agent(live)
            await agent.set_identity(
                os.urandom(64),
                mac=live.record.mac if live.record.network_enabled else None,
                hostname=live.record.name,
            )

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
