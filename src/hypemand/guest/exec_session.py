"""Guest processes: starting one (``exec``), driving it (``ExecSession``), and running one to
completion (``run``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Literal, Self

from hypemand.guest import protocol as p
from hypemand.guest.connection import AgentConnection
from hypemand.guest.models import CompletedExec, ExecResult, OutputChunk
from hypemand.guest.session import AgentError, AgentTimeout, Session, error_from


class ExecSession:
    """A running guest process. Iterate it for output; ``wait()`` for the result.

    A quiet process is never timed out here (``timeout`` of ``exec`` is the guest's limit for
    the program); a frozen guest is: see ``_next_frame``."""

    def __init__(self, session: Session, pid: int, tty: bool, time_limit: float | None = None) -> None:
        self._s = session
        self.pid = pid
        self.tty = tty
        # When the guest should have killed the process (its time limit), on the monotonic clock.
        self._limit_at = None if time_limit is None else time.monotonic() + time_limit
        self._result: ExecResult | None = None
        self._readers = 0
        self._done = asyncio.Event()

    @property
    def result(self) -> ExecResult | None:
        return self._result

    async def write_stdin(self, data: bytes) -> None:
        if self._result is None:
            await self._s.send_data(p.Msg.STDIN, data)

    async def close_stdin(self) -> None:
        """EOF on stdin; for a TTY this types the EOF character (Ctrl-D)."""
        if not self._s.closed:
            self._s.client.send_control(p.encode_frame(self._s.id, p.Msg.STDIN_EOF))

    async def resize(self, rows: int, cols: int) -> None:
        if not self._s.closed:
            self._s.client.send_control(p.resize(self._s.id, rows, cols))

    async def signal(self, signo: int) -> None:
        """Send a signal to the process group of the command."""
        if not self._s.closed:
            self._s.client.send_control(p.signal(self._s.id, signo))

    def __aiter__(self) -> Self:
        return self

    async def _next_frame(self) -> p.Frame:
        """The next frame, however long the process stays quiet, as long as the guest is alive:
        after each ``exec_liveness_interval`` without a frame the agent must answer a ping, and a
        process past its time limit must have been reported. AgentTimeout otherwise (and the
        process is killed should the guest come back)."""
        client = self._s.client
        while True:
            try:
                async with asyncio.timeout(client.exec_liveness_interval):
                    return await self._s.next_frame()
            except TimeoutError:
                pass
            if self._limit_at is not None and time.monotonic() >= self._limit_at:
                self._s.cancel()
                raise AgentTimeout(
                    f"the guest has not reported the end of process {self.pid}, "
                    f"{client.exec_liveness_interval:g} s or more past its time limit"
                )
            try:
                await client.check_alive()
            except AgentTimeout as exc:
                self._s.cancel()
                raise AgentTimeout(f"process {self.pid}: {exc}") from None

    async def __anext__(self) -> OutputChunk:
        """The next output chunk; StopAsyncIteration once the process has exited."""
        self._readers += 1
        try:
            while self._result is None:
                frame = await self._next_frame()
                if frame.type in (p.Msg.STDOUT, p.Msg.STDERR):
                    self._s.consumed(len(frame.payload))
                    stream: Literal["stdout", "stderr"] = "stdout" if frame.type == p.Msg.STDOUT else "stderr"
                    return OutputChunk(stream=stream, data=frame.payload)
                if frame.type == p.Msg.EXIT:
                    self._result = p.decode_exit(frame.payload)
                    self._s.client.forget(self._s.id)
                    self._done.set()
                elif frame.type == p.Msg.ERROR:
                    self._s.client.forget(self._s.id)
                    raise error_from(frame)
            raise StopAsyncIteration
        finally:
            self._readers -= 1

    async def wait(self) -> ExecResult:
        """Wait for the exit. Output nobody is reading is discarded (so the guest never stalls)."""
        while self._result is None:
            if self._readers:  # another task is iterating: it will see the exit
                await self._done.wait()
                break
            async for _ in self:
                pass
        assert self._result is not None
        return self._result

    async def kill(self) -> None:
        """Kill the process group and forget the session (no result will arrive)."""
        self._s.cancel()


class ExecOperations(AgentConnection):
    """The process operations of ``AgentClient``."""

    async def exec(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float | None = None,  # noqa: ASYNC109 - a guest-side limit, enforced by the agent
        merge_stderr: bool = False,
    ) -> ExecSession:
        """Start a process in the guest. Raises AgentError (errno ENOENT etc.) if it cannot start.
        ``timeout`` (seconds) makes the guest kill the process group and report ``timed_out``."""
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        session, started = await self._request(
            lambda sid: p.exec_request(sid, argv, env, cwd or "", tty, rows, cols, timeout_ms, merge_stderr),
            p.Msg.STARTED,
        )
        return ExecSession(session, p.decode_u32(started.payload), tty, timeout)

    async def run(
        self,
        argv: Sequence[str],
        input: bytes = b"",
        timeout: float | None = None,  # noqa: ASYNC109 - a guest-side limit, enforced by the agent
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> CompletedExec:
        """Run to completion, collecting output. stdin gets ``input`` and then EOF."""
        proc = await self.exec(argv, env=env, cwd=cwd, timeout=timeout)
        stdout: list[bytes] = []
        stderr: list[bytes] = []

        async def feed() -> None:
            with contextlib.suppress(AgentError):
                if input:
                    await proc.write_stdin(input)
                await proc.close_stdin()

        feeder = asyncio.get_running_loop().create_task(feed())
        try:
            async for chunk in proc:
                (stdout if chunk.stream == "stdout" else stderr).append(chunk.data)
            result = await proc.wait()
        except asyncio.CancelledError:
            await proc.kill()
            raise
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        return CompletedExec(
            stdout=b"".join(stdout),
            stderr=b"".join(stderr),
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
        )
