"""One multiplexed session on the guest agent connection, as the host sees it, and the errors
every agent operation raises.

A session is a queue of the frames the reader task routed to it plus the credit it may still
send (``guest/README.md``, "Flow control"). The connection (``connection.py``) owns the
sessions; the operations (``exec.py``, ``transfer.py``, ``client.py``) read from and write to
them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from hypemand.errors import DomainError
from hypemand.guest import protocol as p

if TYPE_CHECKING:
    from hypemand.guest.connection import AgentConnection

SEND_CHUNK = 32 * 1024


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
    """The guest agent did not answer within a bound of ``deadlines.py`` (the guest is frozen, or
    a request is stuck on a hung mount in the guest)."""

    status = 504
    code = "agent_timeout"


def error_from(frame: p.Frame) -> AgentError:
    """The AgentError an ERROR frame carries."""
    err, message = p.decode_error(frame.payload)
    return AgentError(message, err)


class Session:
    """Client-side state of one session: inbound frames, outbound credit."""

    def __init__(self, client: AgentConnection, session_id: int, credit: int) -> None:
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
                self.failure = error_from(frame)
            self.credit_changed.set()
        self.frames.put_nowait(frame)

    def fail(self, error: AgentError) -> None:
        self.closed = True
        self.failure = self.failure or error
        self.frames.put_nowait(error)
        self.credit_changed.set()

    async def next_frame(self, timeout: float | None = None, waiting_for: str = "an answer") -> p.Frame:  # noqa: ASYNC109
        """The next frame; with ``timeout``, AgentTimeout if none comes within that many seconds
        (the session is then cancelled in the guest)."""
        if timeout is None:
            item = await self.frames.get()
        else:
            try:
                async with asyncio.timeout(timeout):
                    item = await self.frames.get()
            except TimeoutError:
                self.cancel()
                raise AgentTimeout(f"the guest agent sent no {waiting_for} for {timeout:g} s") from None
        if isinstance(item, AgentError):
            raise item
        return item

    def consumed(self, n: int) -> None:
        """The user took n data bytes: grant them back to the guest in batches."""
        self._grant_pending += n
        if self._grant_pending >= self.client.initial_window // 4 and not self.closed:
            self.client.send_control(p.window(self.id, self._grant_pending))
            self._grant_pending = 0

    async def send_data(
        self, msg_type: p.Msg, data: bytes | memoryview, idle_timeout: float | None = None
    ) -> None:
        """Send within the guest's credit. With ``idle_timeout``, AgentTimeout (and the session
        cancelled) if the guest takes that long to grant credit or to take the bytes: only for a
        receiver that must consume (a file), never a process's stdin."""
        view = memoryview(data)
        while view:
            try:
                async with asyncio.timeout(idle_timeout):
                    while self.send_credit <= 0 and not self.closed:
                        self.credit_changed.clear()
                        await self.credit_changed.wait()
                    if self.closed:
                        raise self.failure or AgentError("session ended while sending")
                    n = min(len(view), self.send_credit, SEND_CHUNK)
                    await self.client.send_data(p.encode_frame(self.id, msg_type, bytes(view[:n])))
            except TimeoutError:
                self.cancel()
                raise AgentTimeout(f"the guest agent took no data for {idle_timeout:g} s") from None
            self.send_credit -= n
            view = view[n:]

    def cancel(self) -> None:
        """Tell the guest to abandon the session (kill its process, drop a partial file)."""
        if not self.closed:
            self.closed = True
            self.client.send_control(p.encode_frame(self.id, p.Msg.CANCEL))
        self.client.forget(self.id)
