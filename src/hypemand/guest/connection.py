"""The byte stream to the guest agent: dialling, the HELLO handshake, the reader task that
demultiplexes frames into sessions, and the primitives the operations are built from.

``AgentConnection`` is the base of ``client.AgentClient``; it knows no operation beyond opening
a session with a request and waiting for the first answer (``_request``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from hypemand.guest import deadlines
from hypemand.guest import protocol as p
from hypemand.guest.session import AgentDisconnected, AgentError, AgentTimeout, Session, error_from
from hypemand.unixsock import open_unix_connection

_HELLO_FIRST_WAIT = 1.0
_HELLO_RETRY_WAIT = 2.0
# Waiting for the socket to appear: a restore dials while QEMU is still starting, and the guest
# can answer only once the HELLO is there, so the first retries are close together.
_DIAL_FIRST_RETRY = 0.002
_DIAL_MAX_RETRY = 0.02


class _Stream:
    """One connection's transport, reader task and handshake state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = p.FrameDecoder(hunting=True)
        self.task: asyncio.Task[None] | None = None
        self.hello_nonce = 0
        self.hello_ack: asyncio.Future[p.HelloAck] | None = None
        self.established = False  # the first handshake is done


class AgentConnection:
    """Connection to the guest agent behind ``socket_path`` (QEMU's chardev socket, server side)."""

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        self.initial_window = p.INITIAL_WINDOW
        self.guest_version = 0
        self._conn: _Stream | None = None
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        # The bounds of deadlines.py; per client so that a test can shorten them.
        self.request_timeout = deadlines.REQUEST_TIMEOUT
        self.stream_idle_timeout = deadlines.STREAM_IDLE_TIMEOUT
        self.exec_liveness_interval = deadlines.EXEC_LIVENESS_INTERVAL

    # ---------- lifecycle ----------

    @classmethod
    async def connect(cls, socket_path: Path | str, timeout: float = 30.0) -> Self:  # noqa: ASYNC109
        client = cls(socket_path)
        await client._open(timeout)
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.task is not None and not self._conn.task.done()

    async def reconnect(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Start afresh on the same socket path (e.g. a new QEMU after restore). Sessions still
        open fail with AgentDisconnected; the guest drops them too when it sees the HELLO."""
        await self._teardown(AgentDisconnected("reconnecting to the guest agent"))
        await self._open(timeout)

    async def close(self) -> None:
        await self._teardown(AgentDisconnected("agent client closed"))

    async def _open(self, timeout: float) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        conn = await self._dial(deadline)
        self._conn = conn
        conn.task = asyncio.get_running_loop().create_task(self._read_loop(conn))
        try:
            ack = await self._handshake(conn, deadline)
        except BaseException:
            await self._teardown(AgentDisconnected("handshake failed"))
            raise
        self.guest_version = ack.version
        self.initial_window = ack.initial_window
        conn.established = True

    async def _dial(self, deadline: float) -> _Stream:
        # The socket appears once QEMU is up; until then (or while it has another client, whose
        # waiting successors fill the backlog: BlockingIOError) retry. The path may exceed
        # sun_path: open_unix_connection goes through /proc/self/fd/<dirfd>/<name>.
        retry = _DIAL_FIRST_RETRY
        while True:
            try:
                reader, writer = await open_unix_connection(self.socket_path, limit=4 * p.MAX_PAYLOAD)
                return _Stream(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
                if time.monotonic() >= deadline:
                    message = f"cannot connect to the guest agent at {self.socket_path}: {exc}"
                    raise AgentTimeout(message) from exc
                await asyncio.sleep(retry)
                retry = min(retry * 2, _DIAL_MAX_RETRY)

    async def _handshake(self, conn: _Stream, deadline: float) -> p.HelloAck:
        # Only the ACK of the latest HELLO counts: an earlier one may still be queued in the guest,
        # and accepting its ACK early would let that later HELLO drop our new sessions.
        wait = _HELLO_FIRST_WAIT
        first = True
        while True:
            hello_ack = self._send_hello(conn, resync=not first)
            first = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"the guest agent at {self.socket_path} did not answer")
            try:
                async with asyncio.timeout(min(wait, remaining)):
                    await conn.writer.drain()
                    return await asyncio.shield(hello_ack)
            except TimeoutError:
                wait = _HELLO_RETRY_WAIT
            except (ConnectionError, OSError) as exc:
                raise AgentDisconnected(f"guest agent connection lost during handshake: {exc}") from exc

    def _send_hello(self, conn: _Stream, resync: bool) -> asyncio.Future[p.HelloAck]:
        conn.hello_nonce = secrets.randbits(63) | 1  # never AGENT_STARTED_NONCE
        ack: asyncio.Future[p.HelloAck] = asyncio.get_running_loop().create_future()
        conn.hello_ack = ack
        if resync:
            conn.writer.write(p.resync_padding())
        conn.writer.write(p.hello(conn.hello_nonce))
        return ack

    async def _teardown(self, error: AgentError) -> None:
        conn, self._conn = self._conn, None
        self._fail_all(error)
        if conn is None:
            return
        conn.writer.close()
        if conn.task is not None:
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.task
        with contextlib.suppress(Exception):
            await conn.writer.wait_closed()

    # ---------- the reader task: frames to sessions ----------

    async def _read_loop(self, conn: _Stream) -> None:
        reason = "the guest agent connection closed"
        try:
            while True:
                data = await conn.reader.read(4 * p.MAX_PAYLOAD)
                if not data:
                    break
                for frame in conn.decoder.feed(data):
                    self._dispatch(conn, frame)
        except (ConnectionError, OSError) as exc:
            reason = f"the guest agent connection failed: {exc}"
        except p.ProtocolError as exc:
            reason = f"the guest agent sent garbage: {exc}"
        finally:
            if self._conn is conn:
                self._fail_all(AgentDisconnected(reason))
                if conn.hello_ack is not None and not conn.hello_ack.done():
                    conn.hello_ack.set_exception(AgentDisconnected(reason))

    def _dispatch(self, conn: _Stream, frame: p.Frame) -> None:
        if frame.session == p.CONTROL_SESSION:
            if frame.type == p.Msg.HELLO_ACK:
                ack = p.decode_hello_ack(frame.payload)
                if ack.nonce == p.AGENT_STARTED_NONCE:
                    # Before the first handshake is done this may be a stale notice from boot.
                    if conn.established:
                        self._agent_restarted(conn)
                elif (
                    conn.hello_ack is not None and not conn.hello_ack.done() and ack.nonce == conn.hello_nonce
                ):
                    conn.hello_ack.set_result(ack)
            return
        session = self._sessions.get(frame.session)
        if session is None:
            return  # late frames of a session we cancelled
        session.deliver(frame)
        if session.closed and frame.type in p.TERMINAL:
            self._sessions.pop(frame.session, None)

    def _agent_restarted(self, conn: _Stream) -> None:
        """The guest's agent process was restarted (PID 1 does that when it dies); the
        connection is fine. Its sessions died with it. The new agent skips everything until a
        HELLO: written now, it precedes every later request on the stream, so those are served.
        Its ACK needs no waiting for."""
        self._fail_all(AgentDisconnected("the guest agent restarted"))
        ack = self._send_hello(conn, resync=False)
        ack.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it

    def _fail_all(self, error: AgentError) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            session.fail(error)

    # ---------- plumbing used by sessions and operations ----------

    def _require(self) -> _Stream:
        if not self.connected or self._conn is None:
            raise AgentDisconnected("not connected to the guest agent")
        return self._conn

    def send_control(self, frame: bytes) -> None:
        """Small frames go straight into the transport buffer (never blocks)."""
        conn = self._conn
        if conn is not None and not conn.writer.is_closing():
            conn.writer.write(frame)

    async def send_data(self, frame: bytes) -> None:
        conn = self._require()
        conn.writer.write(frame)
        try:
            await conn.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise AgentDisconnected(f"guest agent connection lost: {exc}") from exc

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def _new_session(self, request: bytes | None = None, session_id: int | None = None) -> Session:
        conn = self._require()
        sid = session_id if session_id is not None else next(self._ids)
        session = Session(self, sid, self.initial_window)
        self._sessions[sid] = session
        if request is not None:
            conn.writer.write(request)
        return session

    async def _request(self, build: Callable[[int], bytes], expect: p.Msg) -> tuple[Session, p.Frame]:
        """Open a session with a request and wait for its first answer, which must be ``expect``
        (an ERROR frame raises the guest's error; none within ``request_timeout``, AgentTimeout)."""
        sid = next(self._ids)
        session = self._new_session(build(sid), sid)
        try:
            frame = await session.next_frame(self.request_timeout, f"{expect.name} answer")
        except asyncio.CancelledError:
            session.cancel()
            raise
        if frame.type == p.Msg.ERROR:
            raise error_from(frame)
        if frame.type != expect:
            session.cancel()
            raise p.ProtocolError(f"expected {expect.name}, got {frame.type:#x}")
        return session, frame

    async def _simple(self, build: Callable[[int], bytes], expect: p.Msg) -> p.Frame:
        _, frame = await self._request(build, expect)
        return frame

    async def check_alive(self) -> None:
        """A PING the agent must answer within ``request_timeout`` (AgentTimeout otherwise): how a
        caller waiting on a quiet session tells a frozen guest from an idle process."""
        await self._simple(lambda sid: p.ping(sid, 0), p.Msg.PONG)
