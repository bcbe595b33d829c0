"""The agent link a restore makes (``AgentLinks.dial_restoring`` / ``adopt_restored``), against
a fake guest agent on a Unix socket that appears only after the dial started, as QEMU's does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypemand.guest import protocol as p
from hypemand.hypervisor.base import VMPaths
from hypemand.instances import agents
from hypemand.instances.agents import AgentLinks
from hypemand.instances.live import LiveInstance
from hypemand.layout import InstancePaths
from tests.instances.test_manager_parts_unit import record


class FakeGuestAgent:
    """Answers HELLO with a HELLO_ACK and SET_CLOCK with OK (or, ``silent``, nothing at all)."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.connections = 0
        self.clock_set_to: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        decoder = p.FrameDecoder(hunting=False)
        try:
            while data := await reader.read(1 << 16):
                for frame in decoder.feed(data):
                    if self.silent:
                        continue
                    if frame.type == p.Msg.HELLO:
                        (_, nonce) = struct.unpack(">IQ", frame.payload[len(p.MAGIC) :])
                        limits = struct.pack(">IQII", p.VERSION, nonce, p.MAX_PAYLOAD, p.INITIAL_WINDOW)
                        writer.write(p.encode_frame(p.CONTROL_SESSION, p.Msg.HELLO_ACK, p.MAGIC + limits))
                    elif frame.type == p.Msg.SET_CLOCK:
                        self.clock_set_to.append(struct.unpack(">q", frame.payload)[0])
                        writer.write(p.encode_frame(frame.session, p.Msg.OK))
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def agent_socket(path: Path, agent: FakeGuestAgent) -> AsyncIterator[None]:
    server = await asyncio.start_unix_server(agent.serve, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def restoring(tmp_path: Path, **changes: object) -> LiveInstance:
    live = LiveInstance(record=record(**changes), paths=InstancePaths(tmp_path / "guest"))
    live.paths.directory.mkdir()
    live.clock_stale = True  # what a restore sets before it adopts the link
    return live


async def test_a_link_dialled_before_the_socket_exists_is_adopted_with_the_clock_set(tmp_path: Path) -> None:
    live = restoring(tmp_path)
    links = AgentLinks()
    linking = links.dial_restoring(live, live.paths.directory)
    assert linking is not None
    await asyncio.sleep(0.05)  # part of the test: QEMU creates the socket after the dial began
    agent = FakeGuestAgent()
    async with agent_socket(VMPaths(live.paths.directory).agent_socket, agent):
        assert await links.adopt_restored(live, linking)
        assert live.agent is not None and live.agent.connected
        assert not live.clock_stale
        assert len(agent.clock_set_to) == 1
        # The adopted link is the one later users get: no second connection, no second clock.
        assert await links.agent(live) is live.agent
        assert agent.connections == 1 and len(agent.clock_set_to) == 1
        await links.close(live)


async def test_a_guest_that_does_not_answer_leaves_no_link_and_the_clock_to_set_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agents, "AGENT_CONNECT_TIMEOUT", 0.3)  # the bound under test, made short
    live = restoring(tmp_path)
    links = AgentLinks()
    agent = FakeGuestAgent(silent=True)
    async with agent_socket(VMPaths(live.paths.directory).agent_socket, agent):
        linking = links.dial_restoring(live, live.paths.directory)
        with caplog.at_level(logging.WARNING, logger="hypemand.instances.agents"):
            assert not await links.adopt_restored(live, linking)
    assert agent.connections == 1
    assert live.agent is None
    assert live.clock_stale, "the next use of the agent sets the clock"
    assert "did not answer after the restore" in caplog.text


async def test_an_instance_without_agent_is_not_dialled(tmp_path: Path) -> None:
    live = restoring(tmp_path, skip_guest_agent=True)
    links = AgentLinks()
    agent = FakeGuestAgent()
    async with agent_socket(VMPaths(live.paths.directory).agent_socket, agent):
        linking = links.dial_restoring(live, live.paths.directory)
        assert linking is None
        assert not await links.adopt_restored(live, linking)
    assert agent.connections == 0 and live.agent is None


async def test_a_failed_restore_abandons_a_dial_still_waiting_for_the_socket(tmp_path: Path) -> None:
    live = restoring(tmp_path)
    links = AgentLinks()
    linking = links.dial_restoring(live, live.paths.directory)
    assert linking is not None
    await links.abandon(linking)
    assert linking.cancelled()
    assert live.agent is None
