"""API tokens: HS256 JWTs signed with the server's secret.

The secret comes from ``JWT_SECRET`` or, failing that, from the data directory's secret file
(``DataLayout.jwt_secret``), which is created (mode 0600) the first time it is needed.
``hypemand token`` mints tokens with it.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

from hypemand.fsutil import write_atomic
from hypemand.layout import DataLayout

ALGORITHM = "HS256"


class InvalidToken(Exception):
    pass


def load_secret(layout: DataLayout, configured: str | None = None) -> str:
    """``configured`` (the settings' JWT_SECRET) wins; else the data directory's secret file."""
    if configured:
        return configured
    path = layout.jwt_secret
    if not path.exists():
        write_atomic(path, secrets.token_hex(32).encode(), mode=0o600)
    return path.read_text().strip()


def mint_token(
    secret: str,
    subject: str = "admin",
    ttl_seconds: int | None = None,
    permissions: list[str] | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now}
    if ttl_seconds is not None:
        claims["exp"] = now + ttl_seconds
    if permissions is not None:
        claims["permissions"] = permissions
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(token, secret, algorithms=[ALGORITHM])
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    return claims
