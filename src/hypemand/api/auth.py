"""Bearer-token authentication for the API and the /v2 registry.

:func:`authorize` is the one token and scope check of the JSON API: the HTTP dependencies
(``require_token``, ``require_scope``) and the WebSocket admission (``api.websocket``) call it,
so both accept the same credentials and refuse with the same ``{code, message}``.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.requests import HTTPConnection

from hypemand.api.errors import ApiError
from hypemand.auth import InvalidToken, verify_token


def bearer_token(connection: HTTPConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:
        # Docker-style clients send the token as the Basic password.
        try:
            _, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return password or None
    return None


def has_scope(claims: dict[str, Any], needed: str) -> bool:
    """A token without a ``permissions`` claim may do everything (as in Hypeman)."""
    granted = claims.get("permissions")
    if granted is None:
        return True
    if not isinstance(granted, list):
        return False  # a malformed claim grants nothing (a string must not match by substring)
    return "*" in granted or needed in granted


def authorize(connection: HTTPConnection, needed: str | None) -> dict[str, Any]:
    """The claims of the API token the connection presents (Bearer, or the Basic password),
    provided it grants ``needed`` (``None``: any valid API token will do).

    Raises :class:`ApiError`: 401 ``unauthorized`` without a valid token, 403 ``Forbidden`` for a
    registry token or a missing scope. An HTTP request or a WebSocket upgrade alike."""
    token = bearer_token(connection)
    if token is None:
        raise ApiError(401, "unauthorized", "missing bearer token")
    try:
        claims = verify_token(connection.app.state.jwt_secret, token)
    except InvalidToken as exc:
        raise ApiError(401, "unauthorized", f"invalid token: {exc}") from exc
    if "repos" in claims:
        # A registry token (builders' pushes) is limited to /v2 and never opens the JSON API.
        raise ApiError(403, "Forbidden", "registry tokens are only valid for /v2")
    if needed is not None and not has_scope(claims, needed):
        raise ApiError(403, "Forbidden", f"missing required scope: {needed}")
    return claims


async def require_token(request: Request) -> dict[str, Any]:
    """A dependency: any valid API token."""
    return authorize(request, None)


_ACTIONS = {"GET": "read", "HEAD": "read", "DELETE": "delete"}


def require_scope(resource: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    """A dependency: a valid token whose permissions include ``<resource>:<action>``, where the
    action follows the method (GET read, DELETE delete, anything else write)."""

    async def check(request: Request) -> dict[str, Any]:
        return authorize(request, f"{resource}:{_ACTIONS.get(request.method, 'write')}")

    return check
