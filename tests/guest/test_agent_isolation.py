"""No agent request can stall the others, and the host bounds every wait for the agent (issue 13,
finding 6). The real guest binary runs on the host (``hostmode.py``); no VM.

A file whose open blocks is made with a write lease (``F_SETLEASE``): a reader's open() then
waits until the lease holder lets go or ``/proc/sys/fs/lease-break-time`` (45 s by default)
passes. A frozen guest is the agent process stopped with SIGSTOP: it answers nothing, as a guest
paused by QEMU would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hypemand.guest.client import AgentClient, AgentError, AgentTimeout, GetEntry

from .hostmode import HostAgent


@contextlib.contextmanager
def write_lease(path: Path) -> Iterator[None]:
    """Hold a write lease on ``path``: anybody's open() of it waits for us (or fails at once with
    O_NONBLOCK). The kernel tells us of a breaker with SIGIO, whose default action would end
    this process."""
    previous = signal.signal(signal.SIGIO, lambda signo, frame: None)
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        yield
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, previous)


async def test_a_blocked_open_does_not_stall_other_sessions(client: AgentClient, tmp_path: Path) -> None:
    """The old agent opened files in its one loop: every other session waited for the lease."""
    leased = tmp_path / "leased"
    leased.write_bytes(b"held")
    with write_lease(leased):
        copy = asyncio.ensure_future(client.read_file(str(leased)))
        started = time.monotonic()
        async with asyncio.timeout(10):
            assert (await client.run(["echo", "served"])).stdout == b"served\n"
            assert (await client.stat(str(leased))).size == 4
            await client.put_file(str(tmp_path / "other"), b"other")
            assert await client.read_file(str(tmp_path / "other")) == b"other"
            await client.ping()
        assert time.monotonic() - started < 10
        # The copy itself ends at once: the worker opens without blocking and reports why.
        async with asyncio.timeout(10):
            with pytest.raises(AgentError, match="temporarily unavailable"):
                await copy


async def test_a_cancelled_copy_kills_its_worker(
    host_agent: HostAgent, client: AgentClient, tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    walk = client.get(str(big))
    entry = await anext(walk)
    assert isinstance(entry, GetEntry)
    async for _chunk in entry:
        break  # the worker now waits for the host's credit, blocked on its pipe
    [worker] = host_agent.children()
    await walk.aclose()  # CANCEL
    await client.ping()  # handled after the CANCEL: the worker was killed by then
    for _ in range(200):
        if worker not in host_agent.children():
            break
        await asyncio.sleep(0.025)
    else:
        pytest.fail(f"worker {worker} of a cancelled copy is still there")
    assert (await client.run(["true"])).exit_code == 0


async def test_a_new_hello_kills_the_workers_of_old_sessions(
    host_agent: HostAgent, client: AgentClient, tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    walk = client.get(str(big))
    entry = await anext(walk)
    assert isinstance(entry, GetEntry)
    assert len(host_agent.children()) == 1
    await client.reconnect(timeout=30)
    await client.ping()
    for _ in range(200):
        if not host_agent.children():
            break
        await asyncio.sleep(0.025)
    else:
        pytest.fail(f"workers of dropped sessions are still there: {host_agent.children()}")
    with contextlib.suppress(AgentError):
        await walk.aclose()


@contextlib.asynccontextmanager
async def frozen(host_agent: HostAgent) -> AsyncIterator[None]:
    assert host_agent.process is not None
    pid = host_agent.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def shorten_bounds(client: AgentClient) -> None:
    client.request_timeout = 0.5
    client.stream_idle_timeout = 0.5
    client.exec_liveness_interval = 0.3


async def test_requests_to_a_frozen_agent_time_out(
    host_agent: HostAgent, client: AgentClient, tmp_path: Path
) -> None:
    shorten_bounds(client)
    async with frozen(host_agent):
        for call in (
            client.ping(),
            client.stat("/"),
            client.mkdir(str(tmp_path / "d")),
            client.symlink("x", str(tmp_path / "l")),
            client.set_clock(),
            client.set_identity(b""),
            client.exec(["true"]),
        ):
            started = time.monotonic()
            with pytest.raises(AgentTimeout):
                async with asyncio.timeout(5):
                    await call
            assert time.monotonic() - started < 2
        assert client._sessions == {}  # each was cancelled and forgotten
    # Once the guest thaws it serves new requests on the same connection.
    client.request_timeout = 20
    assert (await client.run(["echo", "thawed"])).stdout == b"thawed\n"


async def test_streams_from_a_frozen_agent_time_out(
    host_agent: HostAgent, client: AgentClient, tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 * 1024 * 1024))
    shorten_bounds(client)
    walk = client.get(str(big))
    entry = await anext(walk)
    assert isinstance(entry, GetEntry)
    async with frozen(host_agent):
        with pytest.raises(AgentTimeout):
            async with asyncio.timeout(5):
                async for _chunk in entry:
                    pass
        with contextlib.suppress(AgentError):
            await walk.aclose()

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 65536

        with pytest.raises(AgentTimeout):
            async with asyncio.timeout(5):
                await client.put_file(str(tmp_path / "upload"), endless())
    client.request_timeout = client.stream_idle_timeout = 20
    assert (await client.run(["echo", "thawed"])).stdout == b"thawed\n"


async def test_a_quiet_exec_lives_while_the_agent_answers_and_fails_when_it_stops(
    host_agent: HostAgent, client: AgentClient
) -> None:
    shorten_bounds(client)
    # Quiet for several liveness intervals, then done: pinged, never failed.
    quiet = await client.run(["sh", "-c", "sleep 1.5; echo done"])
    assert (quiet.stdout, quiet.exit_code) == (b"done\n", 0)

    shell = await client.exec(["sh"], tty=True)  # an idle interactive shell
    waiter = asyncio.ensure_future(shell.wait())
    await asyncio.sleep(1)
    assert not waiter.done()
    async with frozen(host_agent):
        with pytest.raises(AgentTimeout, match="no PONG"):
            async with asyncio.timeout(5):
                await waiter
