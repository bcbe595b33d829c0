"""The ``cp`` WebSocket (``/instances/{id}/cp``) in the official client's format
(``hypeman.lib.cp``): one JSON request as the first text frame (``direction`` to, from or
stat), then one entry uploaded, a tree of entries downloaded, or a ``PathInfo`` answered."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, cast

from fastapi import APIRouter
from pydantic import Field, ValidationError, field_validator
from starlette.websockets import WebSocket

from hypemand.api.instance_streams import path_info_fields
from hypemand.api.limits import MAX_GUEST_ID, check_guest_path
from hypemand.api.websocket import (
    ClientGone,
    WireRequest,
    admit,
    close_quietly,
    receive,
    receive_request_text,
    send_bytes,
    send_json,
    validation_summary,
)
from hypemand.guest.client import AgentClient, AgentError, GetEntry, GetEntryError
from hypemand.guest.models import EntryType

# Mounted without a router-level auth dependency: admit() checks the token (see api.websocket).
router = APIRouter()

CP_CHUNK_BYTES = 32 * 1024
_DEFAULT_FILE_MODE = 0o644
_DEFAULT_DIR_MODE = 0o755


class CopyRequest(WireRequest):
    """Checked against the guest protocol's limits (``api/limits.py``) before the agent is asked."""

    direction: Literal["to", "from", "stat"]
    guest_path: str
    is_dir: bool = False
    mode: int = Field(0, ge=0, le=0o7777)  # 0: the default for files or directories
    follow_links: bool = False
    uid: int | None = Field(None, ge=0, le=MAX_GUEST_ID)
    gid: int | None = Field(None, ge=0, le=MAX_GUEST_ID)

    @field_validator("guest_path")
    @classmethod
    def _path_ok(cls, value: str) -> str:
        return check_guest_path(value)


def _is_upload(text: str) -> bool:
    """Whether a first frame (valid or not) asks to copy to the guest: the client then sends the
    entry's data and its end frame before it reads an answer."""
    try:
        payload = json.loads(text)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("direction") == "to"


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
            message = await receive(self.websocket)
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
    admitted = await admit(websocket, instance_id)
    if admitted is None:
        return
    agent, _ = admitted
    await websocket.accept()
    try:
        await _serve_copy(websocket, agent)
    except ClientGone:
        pass
    finally:
        await close_quietly(websocket)


async def _serve_copy(websocket: WebSocket, agent: AgentClient) -> None:
    text = await receive_request_text(websocket)
    if text is None:
        message = "the first message must be a JSON text frame"
        await send_json(websocket, {"type": "error", "message": message})
        return
    try:
        request = CopyRequest.model_validate_json(text)
    except ValidationError as exc:
        if _is_upload(text):
            # The SDK reads the answer only after sending the data: take it first (and drop it),
            # so that it sees this error rather than a connection closed under its sends.
            await _UploadFrames(websocket).drain()
        message = f"invalid cp request: {validation_summary(exc)}"
        await send_json(websocket, {"type": "error", "message": message})
        return
    if request.direction == "to":
        await _copy_to_guest(websocket, agent, request)
    elif request.direction == "from":
        await _copy_from_guest(websocket, agent, request)
    else:
        try:
            info = await agent.stat(request.guest_path, follow_links=request.follow_links)
        except AgentError as exc:
            await send_json(websocket, {"type": "error", "message": str(exc), "path": request.guest_path})
            return
        await send_json(websocket, {"type": "stat", **path_info_fields(info)})


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
        await send_json(websocket, {"type": "result", "success": False, "error": str(exc)})
        return
    await send_json(websocket, {"type": "result", "success": True, "bytes_written": written})


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
    await send_json(websocket, _entry_header(entry))
    if entry.header.type is not EntryType.FILE:
        return None
    declared = entry.header.size
    sent = 0
    async for data in entry:
        # The header's size is what the client will accept: a file that grew since is cut there.
        usable = memoryview(data)[: max(0, declared - sent)]
        for start in range(0, len(usable), CP_CHUNK_BYTES):
            await send_bytes(websocket, bytes(usable[start : start + CP_CHUNK_BYTES]))
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
                    await send_json(websocket, {"type": "end", "final": False})
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
        await send_json(websocket, {"type": "end", "final": True})
        return
    if failure is None:
        failure = ("not a regular file, directory or symlink", request.guest_path)
    await send_json(websocket, {"type": "error", "message": failure[0], "path": failure[1]})
