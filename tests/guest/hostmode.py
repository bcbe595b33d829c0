"""Run the real guest agent on the host, reached the way it is in a VM.

In a VM the agent sits on a character device (the virtio-serial port) and QEMU owns the host end as
a unix-socket server that accepts one client and drops the guest's output while nobody is
connected. Here the agent runs as ``hypeman-init agent <pty slave>`` and ``PtyChardev`` plays
QEMU: it relays between the pty master and a unix socket, with the same one-client rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import tty
from pathlib import Path


class PtyChardev:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # raw from the first byte; the agent sets it too
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self._slave)
        self._server: asyncio.Server | None = None
        self._client: asyncio.StreamWriter | None = None
        self._to_guest = bytearray()
        self._writable = asyncio.Event()

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.master, self._from_guest)
        if sock is not None:  # pre-bound (paths longer than sun_path)
            self._server = await asyncio.start_unix_server(self._serve_client, sock=sock)
        else:
            self._server = await asyncio.start_unix_server(self._serve_client, path=str(self.socket_path))

    def _from_guest(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        if self._client is not None and not self._client.is_closing():
            self._client.write(data)
        # else: like QEMU with no chardev client, the guest's bytes are dropped

    async def _write_guest(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self.master, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.master)

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._client is not None:
            writer.close()
            return
        self._client = writer
        try:
            while data := await reader.read(65536):
                await self._write_guest(data)
        except (ConnectionError, OSError):
            pass
        finally:
            if self._client is writer:
                self._client = None
            writer.close()

    def drop_client(self) -> None:
        """What the guest sees when QEMU's peer goes away (e.g. the daemon restarts)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def stop(self) -> None:
        self.drop_client()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.master)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        os.close(self.master)
        os.close(self._slave)


class HostAgent:
    """The guest binary's agent running on the host behind a PtyChardev."""

    def __init__(self, binary: Path, socket_path: Path) -> None:
        self.binary = binary
        self.chardev = PtyChardev(socket_path)
        self.socket_path = socket_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        await self.chardev.start(sock)
        self.process = await asyncio.create_subprocess_exec(
            str(self.binary), "agent", self.chardev.slave_path,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )

    async def restart_agent(self) -> None:
        """What PID 1 does when the agent dies: a fresh agent process on the same port."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = await asyncio.create_subprocess_exec(
            str(self.binary), "agent", self.chardev.slave_path,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )

    def children(self) -> list[int]:
        """Pids of the agent's child processes (its file workers and exec'd commands)."""
        assert self.process is not None
        pid = self.process.pid
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            # The agent's group (it started its own session) holds its file workers too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        await self.chardev.stop()
