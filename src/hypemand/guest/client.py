"""Host side of the guest agent: an asyncio client over the unix socket of QEMU's chardev.

One connection carries many independent sessions (exec, file transfers, stat ...). A single reader
task parses frames and hands each to its session; every data direction is credit-based (see
``guest/README.md``), so a slow consumer stalls only its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import itertools
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from hypemand.errors import DomainError
from hypemand.guest import protocol as p
from hypemand.guest.models import CompletedExec, EntryType, ExecResult, FileEntry, OutputChunk, PathInfo
from hypemand.unixsock import open_unix_connection

SEND_CHUNK = 32 * 1024
_HELLO_FIRST_WAIT = 1.0
_HELLO_RETRY_WAIT = 2.0


class AgentError(DomainError):
    """The guest agent refused or failed an operation. ``errno`` is the guest's errno (0 if none)."""

    status = 500
    code = "agent_error"

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class AgentDisconnected(AgentError):
    """The connection to the agent went away (VM stopped, restored, or the client closed it)."""

    status = 503
    code = "agent_unavailable"


class AgentTimeout(AgentError):
    status = 504
    code = "agent_timeout"


def _error_from(frame: p.Frame) -> AgentError:
    err, message = p.decode_error(frame.payload)
    return AgentError(message, err)


class _Session:
    """Client-side state of one session: inbound frames, outbound credit."""

    def __init__(self, client: AgentClient, session_id: int, credit: int) -> None:
        self.client = client
        self.id = session_id
        self.frames: asyncio.Queue[p.Frame | AgentError] = asyncio.Queue()
        self.send_credit = credit
        self.credit_changed = asyncio.Event()
        self.closed = False  # the guest has forgotten the session (terminal frame or disconnect)
        self.failure: AgentError | None = None
        self._grant_pending = 0

    def deliver(self, frame: p.Frame) -> None:
        if frame.type == p.Msg.WINDOW:
            self.send_credit += p.decode_u32(frame.payload)
            self.credit_changed.set()
            return
        if frame.type in p.TERMINAL:
            self.closed = True
            if frame.type == p.Msg.ERROR:
                self.failure = _error_from(frame)
            self.credit_changed.set()
        self.frames.put_nowait(frame)

    def fail(self, error: AgentError) -> None:
        self.closed = True
        self.failure = self.failure or error
        self.frames.put_nowait(error)
        self.credit_changed.set()

    async def next_frame(self) -> p.Frame:
        item = await self.frames.get()
        if isinstance(item, AgentError):
            raise item
        return item

    def consumed(self, n: int) -> None:
        """The user took n data bytes: grant them back to the guest in batches."""
        self._grant_pending += n
        if self._grant_pending >= self.client.initial_window // 4 and not self.closed:
            self.client.send_control(p.window(self.id, self._grant_pending))
            self._grant_pending = 0

    async def send_data(self, msg_type: p.Msg, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            while self.send_credit <= 0 and not self.closed:
                self.credit_changed.clear()
                await self.credit_changed.wait()
            if self.closed:
                raise self.failure or AgentError("session ended while sending")
            n = min(len(view), self.send_credit, SEND_CHUNK)
            await self.client.send_data(p.encode_frame(self.id, msg_type, bytes(view[:n])))
            self.send_credit -= n
            view = view[n:]

    def cancel(self) -> None:
        """Tell the guest to abandon the session (kill its process, drop a partial file)."""
        if not self.closed:
            self.closed = True
            self.client.send_control(p.encode_frame(self.id, p.Msg.CANCEL))
        self.client.forget(self.id)


class ExecSession:
    """A running guest process. Iterate it for output; ``wait()`` for the result."""

    def __init__(self, session: _Session, pid: int, tty: bool) -> None:
        self._s = session
        self.pid = pid
        self.tty = tty
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

    async def __anext__(self) -> OutputChunk:
        """The next output chunk; StopAsyncIteration once the process has exited."""
        self._readers += 1
        try:
            while self._result is None:
                frame = await self._s.next_frame()
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
                    raise _error_from(frame)
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


class GetEntry:
    """One entry of a copy from the guest; iterate it for the file data (empty for non-files)."""

    def __init__(self, header: FileEntry, session: _Session) -> None:
        self.header = header
        self._s = session
        self.finished = False
        self.error: str | None = None  # set if reading the data failed part-way

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while not self.finished:
            frame = await self._s.next_frame()
            if frame.type == p.Msg.FILE_DATA:
                self._s.consumed(len(frame.payload))
                yield frame.payload
            elif frame.type == p.Msg.ENTRY_END:
                self.finished = True
            elif frame.type == p.Msg.ENTRY_ERROR:
                # A read error after the header: the data is short; ENTRY_END follows.
                self.error = p.decode_entry_error(frame.payload)[1]
            elif frame.type == p.Msg.ERROR:
                self.finished = True
                raise _error_from(frame)
            else:
                raise p.ProtocolError(f"unexpected frame {frame.type:#x} inside an entry")

    async def read_all(self) -> bytes:
        return b"".join([chunk async for chunk in self])


class GetEntryError:
    """An entry that could not be read (the copy goes on with the next one)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message

    def __repr__(self) -> str:
        return f"GetEntryError({self.path!r}, {self.message!r})"


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = p.FrameDecoder(hunting=True)
        self.task: asyncio.Task[None] | None = None
        self.hello_nonce = 0
        self.hello_ack: asyncio.Future[p.HelloAck] | None = None
        self.established = False  # the first handshake is done


class AgentClient:
    """Client of the guest agent behind ``socket_path`` (QEMU's chardev socket, server side)."""

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        self.initial_window = p.INITIAL_WINDOW
        self.guest_version = 0
        self._conn: _Connection | None = None
        self._sessions: dict[int, _Session] = {}
        self._ids = itertools.count(1)

    # ---------- connection ----------

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

    async def _dial(self, deadline: float) -> _Connection:
        # The socket appears once QEMU is up; until then (or while it has another client, whose
        # waiting successors fill the backlog: BlockingIOError) retry. The path may exceed
        # sun_path: open_unix_connection goes through /proc/self/fd/<dirfd>/<name>.
        while True:
            try:
                reader, writer = await open_unix_connection(self.socket_path, limit=4 * p.MAX_PAYLOAD)
                return _Connection(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
                if time.monotonic() >= deadline:
                    message = f"cannot connect to the guest agent at {self.socket_path}: {exc}"
                    raise AgentTimeout(message) from exc
                await asyncio.sleep(0.05)

    async def _handshake(self, conn: _Connection, deadline: float) -> p.HelloAck:
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

    async def _read_loop(self, conn: _Connection) -> None:
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

    def _send_hello(self, conn: _Connection, resync: bool) -> asyncio.Future[p.HelloAck]:
        conn.hello_nonce = secrets.randbits(63) | 1  # never AGENT_STARTED_NONCE
        ack: asyncio.Future[p.HelloAck] = asyncio.get_running_loop().create_future()
        conn.hello_ack = ack
        if resync:
            conn.writer.write(p.resync_padding())
        conn.writer.write(p.hello(conn.hello_nonce))
        return ack

    def _dispatch(self, conn: _Connection, frame: p.Frame) -> None:
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

    def _agent_restarted(self, conn: _Connection) -> None:
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

    # ---------- plumbing used by sessions ----------

    def _require(self) -> _Connection:
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

    def _new_session(self, request: bytes | None = None, session_id: int | None = None) -> _Session:
        conn = self._require()
        sid = session_id if session_id is not None else next(self._ids)
        session = _Session(self, sid, self.initial_window)
        self._sessions[sid] = session
        if request is not None:
            conn.writer.write(request)
        return session

    async def _request(self, build: Callable[[int], bytes], expect: p.Msg) -> tuple[_Session, p.Frame]:
        """Open a session with a request and wait for its first answer, which must be ``expect``
        (an ERROR frame raises the guest's error)."""
        sid = next(self._ids)
        session = self._new_session(build(sid), sid)
        try:
            frame = await session.next_frame()
        except asyncio.CancelledError:
            session.cancel()
            raise
        if frame.type == p.Msg.ERROR:
            raise _error_from(frame)
        if frame.type != expect:
            session.cancel()
            raise p.ProtocolError(f"expected {expect.name}, got {frame.type:#x}")
        return session, frame

    async def _simple(self, build: Callable[[int], bytes], expect: p.Msg) -> p.Frame:
        _, frame = await self._request(build, expect)
        return frame

    # ---------- operations ----------

    async def ping(self) -> float:
        """Round trip through the guest agent, in seconds."""
        token = secrets.randbits(63)
        start = time.perf_counter()
        frame = await self._simple(lambda sid: p.ping(sid, token), p.Msg.PONG)
        if p.decode_u64(frame.payload) != token:
            raise p.ProtocolError("PONG carries the wrong token")
        return time.perf_counter() - start

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
        return ExecSession(session, p.decode_u32(started.payload), tty)

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

    async def put_file(
        self,
        guest_path: str,
        source: bytes | AsyncIterable[bytes],
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> int:
        """Write a file in the guest (parents created, replaced atomically). Returns bytes written."""
        sid = next(self._ids)
        session = self._new_session(p.put_request(sid, guest_path, mode, uid, gid, mtime_ns), sid)
        try:
            if isinstance(source, bytes | bytearray | memoryview):
                await session.send_data(p.Msg.FILE_DATA, source)
            else:
                async for chunk in source:
                    await session.send_data(p.Msg.FILE_DATA, chunk)
            if session.closed:
                raise session.failure or AgentError("put ended early")
            self.send_control(p.encode_frame(sid, p.Msg.FILE_END))
            frame = await session.next_frame()
        except BaseException:
            # Whatever ended the transfer (cancellation, the agent, the caller's source failing),
            # the guest must drop its temporary file and we must forget the session.
            session.cancel()
            raise
        if frame.type == p.Msg.ERROR:
            raise _error_from(frame)
        if frame.type != p.Msg.PUT_DONE:
            raise p.ProtocolError(f"expected PUT_DONE, got {frame.type:#x}")
        return p.decode_u64(frame.payload)

    async def mkdir(
        self,
        guest_path: str,
        mode: int = 0o755,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
        parents: bool = True,
    ) -> None:
        """Create a directory (fine if it exists), then apply mode, owner and mtime."""
        await self._simple(
            lambda sid: p.mkdir_request(sid, guest_path, mode, uid, gid, mtime_ns, parents), p.Msg.OK
        )

    async def symlink(
        self,
        target: str,
        guest_path: str,
        uid: int | None = None,
        gid: int | None = None,
        replace: bool = True,
    ) -> None:
        await self._simple(
            lambda sid: p.symlink_request(sid, target, guest_path, uid, gid, replace), p.Msg.OK
        )

    async def stat(self, guest_path: str, follow_links: bool = False) -> PathInfo:
        frame = await self._simple(
            lambda sid: p.stat_request(sid, guest_path, follow_links), p.Msg.STAT_RESULT
        )
        return p.decode_stat_result(frame.payload)

    async def set_clock(self, unix_ns: int | None = None) -> None:
        """Set the guest wall clock (default: the host's now), e.g. after a restore."""
        value = time.time_ns() if unix_ns is None else unix_ns
        await self._simple(lambda sid: p.set_clock_request(sid, value), p.Msg.OK)

    async def set_identity(self, entropy: bytes, mac: str | None = None, hostname: str | None = None) -> None:
        """Give a guest resumed from a shared memory image its own identity: ``entropy`` (the
        caller's ``os.urandom(64)``; at most 512 bytes) is mixed into the kernel's pool, credited,
        and the CRNG reseeded at once; ``mac`` (``"52:54:00:…"``) becomes eth0's address (its
        IPv4 address and routes are kept); ``hostname`` is set. ``None`` or empty keeps the
        current value. Raises ``AgentError`` with the guest's errno; steps before the failing one
        (entropy, hostname, MAC, in that order) stay done."""
        raw_mac = p.parse_mac(mac) if mac else b""
        await self._simple(lambda sid: p.identity_request(sid, entropy, raw_mac, hostname or ""), p.Msg.OK)

    async def get(
        self, guest_path: str, follow_links: bool = False, recursive: bool = True
    ) -> AsyncIterator[GetEntry | GetEntryError]:
        """Stream a file or a directory tree out of the guest, entry by entry (parents first).
        Read each entry's data before moving on (unread data is skipped). Raises AgentError if
        the path itself cannot be read."""
        sid = next(self._ids)
        session = self._new_session(p.get_request(sid, guest_path, follow_links, recursive), sid)
        current: GetEntry | None = None
        try:
            while True:
                if current is not None and not current.finished:
                    async for _ in current:
                        pass
                frame = await session.next_frame()
                if frame.type == p.Msg.ENTRY:
                    current = GetEntry(p.decode_entry(frame.payload), session)
                    yield current
                elif frame.type == p.Msg.ENTRY_ERROR:
                    yield GetEntryError(*p.decode_entry_error(frame.payload))
                elif frame.type == p.Msg.GET_DONE:
                    return
                elif frame.type == p.Msg.ERROR:
                    raise _error_from(frame)
                else:
                    raise p.ProtocolError(f"unexpected frame {frame.type:#x} in a get stream")
        finally:
            if not session.closed:
                session.cancel()
            self.forget(sid)

    async def read_file(self, guest_path: str, follow_links: bool = True) -> bytes:
        """Convenience: the content of one regular file."""
        async for item in self.get(guest_path, follow_links=follow_links, recursive=False):
            if isinstance(item, GetEntryError):
                raise AgentError(f"{item.path}: {item.message}", errno_mod.EIO)
            if item.header.type is not EntryType.FILE:
                raise AgentError(f"{guest_path} is not a regular file", errno_mod.EISDIR)
            return await item.read_all()
        raise AgentError(f"{guest_path}: nothing returned", errno_mod.EIO)
