"""Bearer-token authentication for the API and the /v2 registry."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from hypemand.api.errors import ApiError
from hypemand.auth import InvalidToken, verify_token


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
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


async def require_token(request: Request) -> dict[str, Any]:
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthorized", "missing bearer token")
    try:
        claims = verify_token(request.app.state.jwt_secret, token)
    except InvalidToken as exc:
        raise ApiError(401, "unauthorized", f"invalid token: {exc}") from exc
    if "repos" in claims:
        # A registry token (builders' pushes) is limited to /v2 and never opens the JSON API.
        raise ApiError(403, "Forbidden", "registry tokens are only valid for /v2")
    return claims


_ACTIONS = {"GET": "read", "HEAD": "read", "DELETE": "delete"}


def has_scope(claims: dict[str, Any], needed: str) -> bool:
    """A token without a ``permissions`` claim may do everything (as in Hypeman)."""
    granted = claims.get("permissions")
    if granted is None:
        return True
    if not isinstance(granted, list):
        return False  # a malformed claim grants nothing (a string must not match by substring)
    return "*" in granted or needed in granted


def require_scope(resource: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    """A dependency: a valid token whose permissions include ``<resource>:<action>``, where the
    action follows the method (GET read, DELETE delete, anything else write)."""

    async def check(request: Request) -> dict[str, Any]:
        claims = await require_token(request)
        needed = f"{resource}:{_ACTIONS.get(request.method, 'write')}"
        if not has_scope(claims, needed):
            raise ApiError(403, "Forbidden", f"missing required scope: {needed}")
        return claims

    return check
