"""What the ``exec`` and ``cp`` WebSockets share: admission before the upgrade, sends and
receives that turn a vanished client into one exception, and the first-frame request model.

FastAPI cannot give a ``Request`` to a dependency of a WebSocket route, so these routes are
mounted without a router-level auth dependency and :func:`admit` runs the HTTP routes' own check
(``api.auth.authorize``) itself. A refusal is a real HTTP response in the ``{code, message}``
shape, sent instead of the upgrade.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from hypemand.api.auth import authorize
from hypemand.api.errors import ApiError, error_response
from hypemand.api.instance_streams import instance_streams
from hypemand.errors import DomainError
from hypemand.guest.client import AgentClient

WEBSOCKET_SCOPE = "instance:write"
_CLOSE_REASON_MAX = 120  # a close frame's reason is limited to 123 bytes


class ClientGone(Exception):
    """The WebSocket client closed or vanished."""


async def deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with an HTTP response in the API's error shape."""
    try:
        await websocket.send_denial_response(error_response(status, code, message))
    except RuntimeError:
        # A server without the denial-response extension answers a close before accept with 403.
        await websocket.close(code=1008, reason=message.encode()[:_CLOSE_REASON_MAX].decode(errors="ignore"))


async def admit(websocket: WebSocket, instance_ref: str) -> tuple[AgentClient, dict[str, Any]] | None:
    """Token, scope and a Running instance, checked before the upgrade: the instance's agent and
    the token's claims, or None once the upgrade has been refused."""
    try:
        claims = authorize(websocket, WEBSOCKET_SCOPE)
    except ApiError as exc:
        await deny(websocket, exc.status, exc.code, exc.message)
        return None
    try:
        agent = await instance_streams(websocket).guest_agent(instance_ref)
    except DomainError as exc:
        await deny(websocket, exc.status, exc.code, str(exc))
        return None
    return agent, claims


async def receive(websocket: WebSocket) -> Message:
    try:
        message = await websocket.receive()
    except (WebSocketDisconnect, WebSocketDisconnected) as exc:
        raise ClientGone from exc
    if message["type"] == "websocket.disconnect":
        raise ClientGone
    return message


async def receive_request_text(websocket: WebSocket) -> str | None:
    """The first frame, which must be text (a JSON request); None if it is binary."""
    message = await receive(websocket)
    text = message.get("text")
    return text if isinstance(text, str) else None


async def send_bytes(websocket: WebSocket, data: bytes) -> None:
    try:
        await websocket.send_bytes(data)
    except (WebSocketDisconnect, WebSocketDisconnected) as exc:
        raise ClientGone from exc


async def send_text(websocket: WebSocket, text: str) -> None:
    try:
        await websocket.send_text(text)
    except (WebSocketDisconnect, WebSocketDisconnected) as exc:
        raise ClientGone from exc


async def send_json(websocket: WebSocket, payload: dict[str, Any]) -> None:
    await send_text(websocket, json.dumps(payload))


async def close_quietly(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, RuntimeError, OSError):
        await websocket.close()


def validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


class WireRequest(BaseModel):
    """First-frame requests: unknown keys are ignored and ``null`` means "not given"."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data
