"""``hypemand.unixsock``: Unix sockets at paths of any length (QMP and the guest agent use it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypemand.guest.client import AgentClient, AgentTimeout
from hypemand.unixsock import connect_unix, open_unix_connection


@contextlib.contextmanager
def bound_socket(path: Path) -> Iterator[socket.socket]:
    """A Unix stream socket bound at ``path`` whatever its length (through the directory's fd)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
    finally:
        os.close(dir_fd)
    try:
        yield sock
    finally:
        sock.close()


def long_socket_path(base: Path) -> Path:
    directory = base / ("d" * 60) / ("e" * 60)
    directory.mkdir(parents=True)
    path = directory / "server.sock"
    assert len(os.fsencode(path)) > 108
    return path


@pytest.mark.parametrize("length", ["short", "long"])
async def test_round_trip(tmp_path: Path, length: str) -> None:
    path = tmp_path / "s.sock" if length == "short" else long_socket_path(tmp_path)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    with bound_socket(path) as sock:
        server = await asyncio.start_unix_server(echo, sock=sock)
        async with server:
            reader, writer = await open_unix_connection(path)
            try:
                writer.write(b"hello\n")
                assert await reader.readline() == b"hello\n"
            finally:
                writer.close()
                await writer.wait_closed()


def test_errors_are_those_of_connect(tmp_path: Path) -> None:
    path = long_socket_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        connect_unix(path)
    with bound_socket(path) as sock:
        with pytest.raises(ConnectionRefusedError):  # bound, not listening
            connect_unix(path)
        sock.listen(0)  # room for one waiting connection
        with connect_unix(path), pytest.raises(BlockingIOError):
            connect_unix(path)


async def test_agent_client_waits_out_a_full_backlog(tmp_path: Path) -> None:
    """QEMU's chardev serves one client; later ones wait in the backlog, and once that is full
    connect fails with EAGAIN. The client keeps trying until its deadline, like while QEMU is not
    listening yet, instead of failing at once with an OSError."""
    path = long_socket_path(tmp_path)
    with bound_socket(path) as sock:
        sock.listen(0)
        with connect_unix(path), pytest.raises(AgentTimeout, match="cannot connect"):
            await AgentClient.connect(path, timeout=0.3)
