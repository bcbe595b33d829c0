"""Streaming routes: instance logs (SSE), ``stat``, and the ``exec`` and ``cp`` WebSockets.

The wire formats are the official clients' (``hypeman.lib.exec``, ``hypeman.lib.cp``,
``instances.logs``/``instances.stat``; see ``api/README.md``). The handlers only translate
between those formats and the guest agent (``guest.client.AgentClient``), reached through the
instance manager's :class:`InstanceStreams` side.

Mount this router **without** a router-level auth dependency: FastAPI cannot give a ``Request``
to a dependency of a WebSocket route. The HTTP routes carry their own ``require_scope``; the
WebSockets check the bearer token themselves and refuse before the upgrade with a real HTTP
response in the ``{code, message}`` shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import HTTPConnection
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from hypemand.api.auth import has_scope, require_scope
from hypemand.api.errors import ApiError, error_response
from hypemand.auth import InvalidToken, verify_token
from hypemand.errors import DomainError, NotFound
from hypemand.guest.client import AgentClient, AgentError, ExecSession, GetEntry, GetEntryError
from hypemand.guest.models import EntryType, ExecResult, PathInfo

log = logging.getLogger(__name__)

router = APIRouter()


class InstanceStreams(Protocol):
    """What these routes need from the instance manager (``app.state.runtime.instances``)."""

    async def guest_agent(self, ref: str, wait_for_agent: float = 0.0) -> AgentClient:
        """The connected agent of a Running instance. ref: id, exact name or unique id prefix.
        Raises NotFound (404), Conflict "ambiguous" (409), InvalidState (409 invalid_state) if
        not Running after waiting up to ``wait_for_agent`` seconds."""
        ...

    async def log_file(self, ref: str, source: str) -> Path:
        """The log file of source app|vmm|hypeman; it may not exist yet. Raises NotFound."""
        ...


def _instances(connection: HTTPConnection) -> InstanceStreams:
    instances: InstanceStreams = connection.app.state.runtime.instances
    return instances


# --------------------------------------------------------------------------------------------
# Logs: Server-Sent Events, one JSON string per line
# --------------------------------------------------------------------------------------------

LogSource = Literal["app", "vmm", "hypeman"]

LOG_POLL_SECONDS = 0.15
KEEPALIVE_SECONDS = 15.0
TAIL_BLOCK_BYTES = 64 * 1024
# How far back from the end the tail may look: a file without newlines must not be read whole.
TAIL_SCAN_LIMIT_BYTES = 16 << 20
# A line longer than this is cut, so an endless line cannot fill memory.
MAX_LINE_BYTES = 1 << 20
# Bytes read per follow poll; a writer faster than that is caught up with over several polls.
FOLLOW_READ_BYTES = 1 << 20
_FOLLOW_READ_STEP = 256 * 1024
# Initial lines go out in batches, so a large tail does not become one huge chunk.
_SSE_BATCH_LINES = 500


def decode_log_line(raw: bytes | bytearray) -> str:
    """One line without its newline. The serial console ends lines with CRLF; the CR goes too
    (as Go's line scanner, and so the original server, drops it)."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return bytes(raw).decode("utf-8", errors="replace")


class LineSplitter:
    """Cuts appended chunks into lines. A partial last line is held until its newline arrives
    (or until it grows past ``max_line_bytes``: then it is emitted in pieces)."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()

    @property
    def pending(self) -> bytes:
        return bytes(self._partial)

    def feed(self, data: bytes) -> list[str]:
        self._partial += data
        *complete, rest = self._partial.split(b"\n")
        lines = [decode_log_line(raw) for raw in complete]
        while len(rest) > self.max_line_bytes:
            lines.append(decode_log_line(rest[: self.max_line_bytes]))
            rest = rest[self.max_line_bytes :]
        self._partial = bytearray(rest)
        return lines


@dataclass(frozen=True)
class LogTail:
    lines: list[str]  # the last complete lines, at most the count asked for
    partial: bytes  # an unterminated last line ("" if the file ends with a newline)
    partial_offset: int  # where ``partial`` starts: following resumes there


def read_tail(
    file: BinaryIO,
    count: int,
    block_bytes: int = TAIL_BLOCK_BYTES,
    scan_limit: int = TAIL_SCAN_LIMIT_BYTES,
) -> LogTail:
    """The last ``count`` complete lines of a file, read backwards from its end in blocks, so a
    multi-GB log costs only its last few blocks. Blocking: call it in a worker thread."""
    size = os.fstat(file.fileno()).st_size
    blocks: list[bytes] = []
    start = size
    newlines = 0
    # count lines need count + 1 newlines: the one before the first line says where it starts.
    while start > 0 and size - start < scan_limit and newlines <= count:
        step = min(block_bytes, start, scan_limit - (size - start))
        start -= step
        file.seek(start)
        block = file.read(step)
        blocks.append(block)
        newlines += block.count(b"\n")
    blocks.reverse()
    data = b"".join(blocks)
    cut = data.rfind(b"\n") + 1  # just past the last complete line; 0 if there is none
    pieces = data[:cut].split(b"\n")[:-1] if cut else []
    if start > 0 and pieces:
        pieces = pieces[1:]  # the scan began inside a line: its first piece is not a whole line
    lines = [decode_log_line(raw) for raw in pieces[-count:]] if count else []
    return LogTail(lines=lines, partial=data[cut:], partial_offset=start + cut)


class LogFollower:
    """What is appended to a log file after an offset, across truncation (starts again at 0)
    and rotation (the old file is read to its end, then the new one from its start).

    ``read_new`` blocks (file I/O) and runs in a worker thread; ``close`` never blocks, so the
    event loop may call it even while a read is in progress (that read's thread then closes)."""

    def __init__(
        self,
        path: Path,
        file: BinaryIO,
        offset: int,
        read_limit: int = FOLLOW_READ_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.path = path
        self._file = file
        self._offset = offset
        self._read_limit = read_limit
        self._splitter = LineSplitter(max_line_bytes)
        self._lock = threading.Lock()
        self._close_requested = False
        self._closed = False

    @property
    def pending(self) -> bytes:
        return self._splitter.pending

    def read_new(self) -> list[str]:
        with self._lock:
            lines = [] if self._closed else self._read_locked()
        if self._close_requested:
            self._close_if_idle()
        return lines

    def close(self) -> None:
        # The flag is set before trying the lock: a reader that holds the lock now checks the
        # flag after releasing it, so one of the two closes the file.
        self._close_requested = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._closed = True
                    self._file.close()
            finally:
                self._lock.release()

    def _read_locked(self) -> list[str]:
        current = os.fstat(self._file.fileno())
        if current.st_size < self._offset:
            # Truncated in place (copytruncate): the writer goes on from the start. A held partial
            # line is kept: the writer's next bytes continue it.
            self._offset = 0
        elif current.st_size == self._offset and self._replaced(current):
            # Rotated, and the old file is read to its end: go on with the new one.
            try:
                successor = open(self.path, "rb", buffering=0)  # noqa: SIM115 - owned by self
            except FileNotFoundError:
                return []
            self._file.close()
            self._file = successor
            self._offset = 0
        return self._drain()

    def _replaced(self, current: os.stat_result) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away and no successor yet: the old file may still grow
        return (named.st_ino, named.st_dev) != (current.st_ino, current.st_dev)

    def _drain(self) -> list[str]:
        lines: list[str] = []
        budget = self._read_limit
        while budget > 0:
            chunk = os.pread(self._file.fileno(), min(budget, _FOLLOW_READ_STEP), self._offset)
            if not chunk:
                break
            self._offset += len(chunk)
            budget -= len(chunk)
            lines += self._splitter.feed(chunk)
        return lines


def _sse_event(line: str) -> bytes:
    # JSON keeps the payload on one line (newlines escaped) and is what the SDKs decode.
    return f"data: {json.dumps(line)}\n\n".encode()


def _open_log(path: Path, tail: int, follow: bool) -> tuple[list[str], LogFollower | None]:
    """Blocking: the last ``tail`` lines and, when following, a follower positioned after them."""
    file = open(path, "rb", buffering=0)  # noqa: SIM115 - handed to the follower or closed here
    try:
        found = read_tail(file, tail)
    except BaseException:
        file.close()
        raise
    if follow:
        # The follower starts at the partial last line, which it emits once it is complete.
        return found.lines, LogFollower(path, file, found.partial_offset)
    file.close()
    lines = found.lines
    if found.partial and tail:
        lines = [*lines, decode_log_line(found.partial)][-tail:]
    return lines, None


async def _log_events(initial: list[str], follower: LogFollower | None) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    try:
        for first in range(0, len(initial), _SSE_BATCH_LINES):
            yield b"".join(_sse_event(line) for line in initial[first : first + _SSE_BATCH_LINES])
        if follower is None:
            return
        quiet_since = loop.time()
        while True:
            lines = await asyncio.to_thread(follower.read_new)
            if lines:
                yield b"".join(_sse_event(line) for line in lines)
                quiet_since = loop.time()
                continue  # there may be more already: poll again at once
            if loop.time() - quiet_since >= KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                quiet_since = loop.time()
            await asyncio.sleep(LOG_POLL_SECONDS)
    finally:
        # Starlette cancels this generator when the client disconnects; close() never blocks.
        if follower is not None:
            follower.close()


@router.get("/instances/{instance_id}/logs", dependencies=[Depends(require_scope("instance"))])
async def stream_logs(
    request: Request,
    instance_id: str,
    tail: int = Query(100, ge=0),
    follow: bool = False,
    source: LogSource = "app",
) -> StreamingResponse:
    path = await _instances(request).log_file(instance_id, source)
    try:
        initial, follower = await asyncio.to_thread(_open_log, path, tail, follow)
    except FileNotFoundError as exc:
        raise NotFound(f"instance {instance_id} has no {source} log yet", code="log_not_found") from exc
    return StreamingResponse(
        _log_events(initial, follower),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --------------------------------------------------------------------------------------------
# stat
# --------------------------------------------------------------------------------------------


def _path_info_fields(info: PathInfo) -> dict[str, Any]:
    """The SDK's ``PathInfo``: link_target only for a symlink, error only when there is one."""
    fields: dict[str, Any] = {
        "exists": info.exists,
        "is_dir": info.is_dir,
        "is_file": info.is_file,
        "is_symlink": info.is_symlink,
        "mode": info.mode,
        "size": info.size,
    }
    if info.is_symlink:
        fields["link_target"] = info.link_target
    if info.error:
        fields["error"] = info.error
    return fields


@router.get("/instances/{instance_id}/stat", dependencies=[Depends(require_scope("instance"))])
async def stat_path(
    request: Request,
    instance_id: str,
    path: str = Query(..., min_length=1),
    follow_links: bool = False,
) -> dict[str, Any]:
    agent = await _instances(request).guest_agent(instance_id)
    return _path_info_fields(await agent.stat(path, follow_links=follow_links))


# --------------------------------------------------------------------------------------------
# WebSocket plumbing: admission before the upgrade, sends that notice a vanished client
# --------------------------------------------------------------------------------------------

WEBSOCKET_SCOPE = "instance:write"
_CLOSE_REASON_MAX = 120  # a close frame's reason is limited to 123 bytes


class _ClientGone(Exception):
    """The WebSocket client closed or vanished."""


def _token_problem(websocket: WebSocket, needed: str) -> tuple[ApiError | None, dict[str, Any]]:
    """The same rules as ``api.auth.require_scope``, for a WebSocket upgrade request."""
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ApiError(401, "unauthorized", "missing bearer token"), {}
    try:
        claims = verify_token(websocket.app.state.jwt_secret, token.strip())
    except InvalidToken as exc:
        return ApiError(401, "unauthorized", f"invalid token: {exc}"), {}
    if "repos" in claims:
        return ApiError(403, "Forbidden", "registry tokens are only valid for /v2"), claims
    if not has_scope(claims, needed):
        return ApiError(403, "Forbidden", f"missing required scope: {needed}"), claims
    return None, claims


async def _deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with an HTTP response in the API's error shape."""
    try:
        await websocket.send_denial_response(error_response(status, code, message))
    except RuntimeError:
        # A server without the denial-response extension answers a close before accept with 403.
        await websocket.close(code=1008, reason=message.encode()[:_CLOSE_REASON_MAX].decode(errors="ignore"))


async def _admit(websocket: WebSocket, instance_ref: str) -> tuple[AgentClient, dict[str, Any]] | None:
    """Token, scope and a Running instance, checked before the upgrade; None if refused."""
    problem, claims = _token_problem(websocket, WEBSOCKET_SCOPE)
    if problem is not None:
        await _deny(websocket, problem.status, problem.code, problem.message)
        return None
    try:
        agent = await _instances(websocket).guest_agent(instance_ref)
    except DomainError as exc:
        await _deny(websocket, exc.status, exc.code, str(exc))
        return None
    return agent, claims


async def _receive(websocket: WebSocket) -> Message:
    try:
        message = await websocket.receive()
    except (WebSocketDisconnect, WebSocketDisconnected) as exc:
        raise _ClientGone from exc
    if message["type"] == "websocket.disconnect":
        raise _ClientGone
    return message


async def _receive_request_text(websocket: WebSocket) -> str | None:
    """The first frame, which must be text (a JSON request); None if it is binary."""
    message = await _receive(websocket)
    text = message.get("text")
    return text if isinstance(text, str) else None


async def _send_bytes(websocket: WebSocket, data: bytes) -> None:
    try:
        await websocket.send_bytes(data)
    except (WebSocketDisconnect, WebSocketDisconnected) as exc:
        raise _ClientGone from exc


async def _send_text(websocket: WebSocket, text: str) -> None:
    try:
        await websocket.send_text(text)
    except (WebSocketDisconnect, WebSocketDisconnected) as exc:
        raise _ClientGone from exc


async def _send_json(websocket: WebSocket, payload: dict[str, Any]) -> None:
    await _send_text(websocket, json.dumps(payload))


async def _close_quietly(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, RuntimeError, OSError):
        await websocket.close()


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


class _WireRequest(BaseModel):
    """First-frame requests: unknown keys are ignored and ``null`` means "not given"."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


# --------------------------------------------------------------------------------------------
# exec
# --------------------------------------------------------------------------------------------


class ExecRequest(_WireRequest):
    command: list[str] = Field(default_factory=lambda: ["/bin/sh"])
    tty: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = ""
    timeout: float = Field(0, ge=0)  # seconds; 0: no limit
    wait_for_agent: float = Field(0, ge=0)  # seconds
    rows: int = Field(24, ge=1, le=65535)
    cols: int = Field(80, ge=1, le=65535)

    @model_validator(mode="after")
    def _default_command(self) -> ExecRequest:
        if not self.command:
            self.command = ["/bin/sh"]
        return self


def _resize_request(text: str) -> tuple[int, int] | None:
    """(rows, cols) if a text frame is ``{"resize": {"rows": R, "cols": C}}``, else None."""
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("resize"), dict):
        return None
    rows, cols = payload["resize"].get("rows"), payload["resize"].get("cols")
    for value in (rows, cols):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
            return None
    return rows, cols


def _exit_frame(exit_code: int) -> str:
    # The SDK accepts exactly this object, nothing more.
    return json.dumps({"exitCode": exit_code})


async def _exec_failed(websocket: WebSocket, message: str) -> None:
    """The protocol's way to report a command that could not run: text on the output, 127."""
    await _send_bytes(websocket, f"Error: {message}\r\n".encode())
    await _send_text(websocket, _exit_frame(127))


async def _forward_output(websocket: WebSocket, session: ExecSession) -> ExecResult:
    async for chunk in session:
        await _send_bytes(websocket, chunk.data)
    return await session.wait()


async def _forward_input(websocket: WebSocket, session: ExecSession, tty: bool) -> None:
    """Client frames to the process: binary and text frames are stdin, except a TTY resize.
    Returns when the client goes away. The protocol has no stdin EOF: stdin stays open."""
    stdin_open = True
    while True:
        try:
            message = await _receive(websocket)
        except _ClientGone:
            return
        data = message.get("bytes")
        if data is None:
            text = message.get("text") or ""
            size = _resize_request(text) if tty else None
            if size is not None:
                await session.resize(*size)
                continue
            data = text.encode()
        if stdin_open and data:
            try:
                await session.write_stdin(data)
            except AgentError:
                # The process has ended (its exit code is on its way); later input goes nowhere.
                stdin_open = False


async def _run_exec(websocket: WebSocket, session: ExecSession, tty: bool) -> ExecResult | None:
    """Pump both directions until the process exits (its result) or the client leaves (None;
    the process is killed). The exit frame is sent here, after all output."""
    output = asyncio.create_task(_forward_output(websocket, session))
    client = asyncio.create_task(_forward_input(websocket, session, tty))
    try:
        done, _ = await asyncio.wait({output, client}, return_when=asyncio.FIRST_COMPLETED)
        if output not in done:
            return None
        try:
            result = output.result()
        except _ClientGone:
            return None
        except AgentError as exc:
            # The agent connection broke while the command ran (VM stopped or restored).
            await _exec_failed(websocket, str(exc))
            return None
        await _send_text(websocket, _exit_frame(result.exit_code))
        return result
    finally:
        for task in (output, client):
            task.cancel()
        # Collects whatever the tasks ended with; a cancellation of this coroutine still propagates.
        await asyncio.gather(output, client, return_exceptions=True)
        if session.result is None:
            await session.kill()


@router.websocket("/instances/{instance_id}/exec")
async def exec_in_instance(websocket: WebSocket, instance_id: str) -> None:
    admitted = await _admit(websocket, instance_id)
    if admitted is None:
        return
    agent, claims = admitted
    await websocket.accept()
    try:
        await _serve_exec(websocket, instance_id, agent, str(claims.get("sub", "unknown")))
    except _ClientGone:
        pass
    finally:
        await _close_quietly(websocket)


async def _serve_exec(websocket: WebSocket, instance_id: str, agent: AgentClient, subject: str) -> None:
    text = await _receive_request_text(websocket)
    if text is None:
        await _exec_failed(websocket, "the first message must be a JSON text frame")
        return
    try:
        request = ExecRequest.model_validate_json(text)
    except ValidationError as exc:
        await _exec_failed(websocket, f"invalid exec request: {_validation_summary(exc)}")
        return
    started = time.monotonic()
    log.info("exec started: instance=%s subject=%s command=%s tty=%s",
             instance_id, subject, request.command, request.tty)
    try:
        if not agent.connected:
            agent = await _instances(websocket).guest_agent(instance_id, request.wait_for_agent)
        session = await agent.exec(
            request.command,
            env=request.env or None,
            cwd=request.cwd or None,
            tty=request.tty,
            rows=request.rows,
            cols=request.cols,
            timeout=request.timeout or None,
            # Without a TTY the two streams are merged in the guest, so their order is kept.
            merge_stderr=not request.tty,
        )
    except DomainError as exc:
        log.info("exec failed to start: instance=%s subject=%s: %s", instance_id, subject, exc)
        await _exec_failed(websocket, str(exc))
        return
    result = await _run_exec(websocket, session, request.tty)
    log.info("exec ended: instance=%s subject=%s exit_code=%s duration_ms=%d", instance_id, subject,
             result.exit_code if result else "none (client left or agent lost)",
             (time.monotonic() - started) * 1000)


# --------------------------------------------------------------------------------------------
# cp
# --------------------------------------------------------------------------------------------

CP_CHUNK_BYTES = 32 * 1024
_DEFAULT_FILE_MODE = 0o644
_DEFAULT_DIR_MODE = 0o755


class CopyRequest(_WireRequest):
    direction: Literal["to", "from", "stat"]
    guest_path: str = Field(min_length=1)
    is_dir: bool = False
    mode: int = Field(0, ge=0, le=0o7777)  # 0: the default for files or directories
    follow_links: bool = False
    uid: int | None = Field(None, ge=0)
    gid: int | None = Field(None, ge=0)


def _is_end_frame(text: str | None) -> bool:
    if not text:
        return False
    try:
        payload = json.loads(text)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("type") == "end"


class _UploadFrames:
    """The client's side of an upload: binary chunks until a text ``{"type":"end"}``."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.ended = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.ended:
            message = await _receive(self.websocket)
            data = message.get("bytes")
            if data is not None:
                if data:
                    yield data
            elif _is_end_frame(message.get("text")):
                self.ended = True
            # Other text frames carry nothing for an upload and are ignored.

    async def drain(self) -> None:
        async for _ in self.chunks():
            pass


@router.websocket("/instances/{instance_id}/cp")
async def copy_files(websocket: WebSocket, instance_id: str) -> None:
    admitted = await _admit(websocket, instance_id)
    if admitted is None:
        return
    agent, _ = admitted
    await websocket.accept()
    try:
        await _serve_copy(websocket, agent)
    except _ClientGone:
        pass
    finally:
        await _close_quietly(websocket)


async def _serve_copy(websocket: WebSocket, agent: AgentClient) -> None:
    text = await _receive_request_text(websocket)
    if text is None:
        message = "the first message must be a JSON text frame"
        await _send_json(websocket, {"type": "error", "message": message})
        return
    try:
        request = CopyRequest.model_validate_json(text)
    except ValidationError as exc:
        message = f"invalid cp request: {_validation_summary(exc)}"
        await _send_json(websocket, {"type": "error", "message": message})
        return
    if request.direction == "to":
        await _copy_to_guest(websocket, agent, request)
    elif request.direction == "from":
        await _copy_from_guest(websocket, agent, request)
    else:
        try:
            info = await agent.stat(request.guest_path, follow_links=request.follow_links)
        except AgentError as exc:
            await _send_json(websocket, {"type": "error", "message": str(exc), "path": request.guest_path})
            return
        await _send_json(websocket, {"type": "stat", **_path_info_fields(info)})


async def _copy_to_guest(websocket: WebSocket, agent: AgentClient, request: CopyRequest) -> None:
    upload = _UploadFrames(websocket)
    try:
        if request.is_dir:
            await upload.drain()  # a directory entry has no data; the client still ends it
            await agent.mkdir(request.guest_path, mode=request.mode or _DEFAULT_DIR_MODE,
                              uid=request.uid, gid=request.gid)
            written = 0
        else:
            # Streamed: each chunk goes to the guest as it arrives, under the agent's flow control.
            written = await agent.put_file(request.guest_path, upload.chunks(),
                                           mode=request.mode or _DEFAULT_FILE_MODE,
                                           uid=request.uid, gid=request.gid)
    except AgentError as exc:
        # The client reads the result only after sending everything: take the rest first.
        await upload.drain()
        await _send_json(websocket, {"type": "result", "success": False, "error": str(exc)})
        return
    await _send_json(websocket, {"type": "result", "success": True, "bytes_written": written})


def _entry_header(entry: GetEntry) -> dict[str, Any]:
    header = entry.header
    return {
        "type": "header",
        "path": header.path,  # relative, starting with the requested path's base name
        # Permission bits only: the SDK refuses anything above 0o777 (setuid etc. are dropped).
        "mode": header.mode & 0o777,
        "size": header.size if header.type is EntryType.FILE else 0,
        "mtime": max(0, header.mtime_ns // 1_000_000_000),
        "uid": header.uid,
        "gid": header.gid,
        "is_dir": header.is_dir,
        "is_symlink": header.is_symlink,
        "link_target": header.link_target,
    }


async def _send_entry(websocket: WebSocket, entry: GetEntry) -> str | None:
    """Header and data of one entry (not its end frame); an error message if it went wrong."""
    await _send_json(websocket, _entry_header(entry))
    if entry.header.type is not EntryType.FILE:
        return None
    declared = entry.header.size
    sent = 0
    async for data in entry:
        # The header's size is what the client will accept: a file that grew since is cut there.
        usable = memoryview(data)[: max(0, declared - sent)]
        for start in range(0, len(usable), CP_CHUNK_BYTES):
            await _send_bytes(websocket, bytes(usable[start : start + CP_CHUNK_BYTES]))
        sent += len(usable)
    if entry.error:
        return f"read failed: {entry.error}"
    if sent < declared:
        return f"file shrank while being copied ({sent} of {declared} bytes)"
    return None


async def _copy_from_guest(websocket: WebSocket, agent: AgentClient, request: CopyRequest) -> None:
    # An entry's end frame carries "final"; it goes out once the next entry (or the walk's end)
    # shows whether this entry was the last.
    end_pending = False
    failure: tuple[str, str] | None = None  # (message, path)
    # AgentClient.get is an async generator: closing it at once cancels the guest's walk.
    walk = cast(
        AsyncGenerator[GetEntry | GetEntryError, None],
        agent.get(request.guest_path, follow_links=request.follow_links),
    )
    try:
        async with contextlib.aclosing(walk) as items:
            async for item in items:
                if isinstance(item, GetEntry) and item.header.type is EntryType.OTHER:
                    continue  # devices, fifos and sockets have no content to copy
                if end_pending:
                    await _send_json(websocket, {"type": "end", "final": False})
                    end_pending = False
                if isinstance(item, GetEntryError):
                    failure = (item.message, item.path)
                    break
                problem = await _send_entry(websocket, item)
                if problem is not None:
                    failure = (problem, item.header.path)
                    break
                end_pending = True
    except AgentError as exc:
        failure = (str(exc), request.guest_path)
    if failure is None and end_pending:
        await _send_json(websocket, {"type": "end", "final": True})
        return
    if failure is None:
        failure = ("not a regular file, directory or symlink", request.guest_path)
    await _send_json(websocket, {"type": "error", "message": failure[0], "path": failure[1]})
