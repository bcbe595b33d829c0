"""Files in the guest: writing one (``put_file``), directories and symlinks, ``stat``, and
streaming a file or a tree out (``get`` → ``GetEntry`` / ``GetEntryError``, ``read_file``)."""

from __future__ import annotations

import errno as errno_mod
from collections.abc import AsyncIterable, AsyncIterator

from hypemand.guest import protocol as p
from hypemand.guest.connection import AgentConnection
from hypemand.guest.models import EntryType, FileEntry, PathInfo
from hypemand.guest.session import AgentError, Session, error_from


class GetEntry:
    """One entry of a copy from the guest; iterate it for the file data (empty for non-files)."""

    def __init__(self, header: FileEntry, session: Session) -> None:
        self.header = header
        self._s = session
        self.finished = False
        self.error: str | None = None  # set if reading the data failed part-way

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while not self.finished:
            frame = await self._s.next_frame(self._s.client.stream_idle_timeout, "file data")
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
                raise error_from(frame)
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


class FileOperations(AgentConnection):
    """The file operations of ``AgentClient``."""

    async def put_file(
        self,
        guest_path: str,
        source: bytes | AsyncIterable[bytes],
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> int:
        """Write a file in the guest (parents created, replaced atomically). Returns bytes written.
        The guest must take the data and answer within ``stream_idle_timeout`` of each wait
        (AgentTimeout otherwise); the caller's source may take as long as it likes."""
        sid = next(self._ids)
        session = self._new_session(p.put_request(sid, guest_path, mode, uid, gid, mtime_ns), sid)
        idle = self.stream_idle_timeout
        try:
            if isinstance(source, bytes | bytearray | memoryview):
                await session.send_data(p.Msg.FILE_DATA, source, idle)
            else:
                async for chunk in source:
                    await session.send_data(p.Msg.FILE_DATA, chunk, idle)
            if session.closed:
                raise session.failure or AgentError("put ended early")
            self.send_control(p.encode_frame(sid, p.Msg.FILE_END))
            frame = await session.next_frame(idle, "PUT_DONE answer")
        except BaseException:
            # Whatever ended the transfer (cancellation, the agent, the caller's source failing),
            # the guest must drop its temporary file and we must forget the session.
            session.cancel()
            raise
        if frame.type == p.Msg.ERROR:
            raise error_from(frame)
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

    async def get(
        self, guest_path: str, follow_links: bool = False, recursive: bool = True
    ) -> AsyncIterator[GetEntry | GetEntryError]:
        """Stream a file or a directory tree out of the guest, entry by entry (parents first).
        Read each entry's data before moving on (unread data is skipped). Raises AgentError if
        the path itself cannot be read, AgentTimeout if the guest sends nothing for
        ``stream_idle_timeout`` while a frame is awaited."""
        sid = next(self._ids)
        session = self._new_session(p.get_request(sid, guest_path, follow_links, recursive), sid)
        current: GetEntry | None = None
        try:
            while True:
                if current is not None and not current.finished:
                    async for _ in current:
                        pass
                frame = await session.next_frame(self.stream_idle_timeout, "entry")
                if frame.type == p.Msg.ENTRY:
                    current = GetEntry(p.decode_entry(frame.payload), session)
                    yield current
                elif frame.type == p.Msg.ENTRY_ERROR:
                    yield GetEntryError(*p.decode_entry_error(frame.payload))
                elif frame.type == p.Msg.GET_DONE:
                    return
                elif frame.type == p.Msg.ERROR:
                    raise error_from(frame)
                else:
                    raise p.ProtocolError(f"unexpected frame {frame.type:#x} in a get stream")
        finally:
            if not session.closed:
                session.cancel()
            self.forget(sid)

    async def read_file(self, guest_path: str, follow_links: bool = True) -> bytes:
        """Convenience: the content of one regular file. A read that failed part-way (including a
        file that never ends, such as /proc/kmsg) raises AgentError rather than returning less."""
        async for item in self.get(guest_path, follow_links=follow_links, recursive=False):
            if isinstance(item, GetEntryError):
                raise AgentError(f"{item.path}: {item.message}", errno_mod.EIO)
            if item.header.type is not EntryType.FILE:
                raise AgentError(f"{guest_path} is not a regular file", errno_mod.EISDIR)
            data = await item.read_all()
            if item.error is not None:
                raise AgentError(f"{item.header.path}: {item.error}", errno_mod.EIO)
            return data
        raise AgentError(f"{guest_path}: nothing returned", errno_mod.EIO)
