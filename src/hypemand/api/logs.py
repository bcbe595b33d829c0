"""``GET /instances/{id}/logs`` (Server-Sent Events, one JSON string per line) and
``GET /instances/{id}/stat``, in the official SDK's formats (``instances.logs``,
``instances.stat``). The file reading is ``instances.logtail``'s; here it is only put on the
wire, with every blocking read in a worker thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from hypemand.api.auth import require_scope
from hypemand.api.instance_streams import instance_streams, path_info_fields
from hypemand.api.limits import check_guest_path
from hypemand.errors import BadRequest, NotFound
from hypemand.instances.logtail import LogFollower, open_log

# Each route carries its own scope check, so the router mounts like the WebSocket ones.
router = APIRouter()

LogSource = Literal["app", "vmm", "hypeman"]

LOG_POLL_SECONDS = 0.15
KEEPALIVE_SECONDS = 15.0
# Initial lines go out in batches, so a large tail does not become one huge chunk.
_SSE_BATCH_LINES = 500


def _sse_event(line: str) -> bytes:
    # JSON keeps the payload on one line (newlines escaped) and is what the SDKs decode.
    return f"data: {json.dumps(line)}\n\n".encode()


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
    path = await instance_streams(request).log_file(instance_id, source)
    try:
        initial, follower = await asyncio.to_thread(open_log, path, tail, follow)
    except FileNotFoundError as exc:
        raise NotFound(f"instance {instance_id} has no {source} log yet", code="log_not_found") from exc
    return StreamingResponse(
        _log_events(initial, follower),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/instances/{instance_id}/stat", dependencies=[Depends(require_scope("instance"))])
async def stat_path(
    request: Request,
    instance_id: str,
    path: str = Query(..., min_length=1),
    follow_links: bool = False,
) -> dict[str, Any]:
    try:
        check_guest_path(path)  # before the agent: it cannot carry a NUL byte or an endless path
    except ValueError as exc:
        raise BadRequest(f"path: {exc}", code="invalid_request") from None
    agent = await instance_streams(request).guest_agent(instance_id)
    return path_info_fields(await agent.stat(path, follow_links=follow_links))
