"""Every failure becomes one line on stderr and exit status 1; no stack traces.

``describe`` turns the exceptions the SDK, httpx and the WebSocket helpers raise into that line:
the API's ``{code, message}`` as ``code: message``, an unreachable server with the URL that was
tried, a refused key with how to get one.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from hypeman import APIConnectionError, APIStatusError, APITimeoutError, HypemanError
from hypeman.lib import CopyProtocolError, ExecProtocolError

TOKEN_HINT = (
    "on the server's machine, `hypemand token` prints one: export HYPEMAN_API_KEY=$(hypemand token)"
)


class CLIError(Exception):
    """A failure already worded for a person."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def error_body_line(status: int, body: Any) -> str:
    """``code: message`` from the API's error shape, else the status and whatever came back."""
    if isinstance(body, bytes):
        try:
            body = json.loads(body)
        except ValueError:
            body = body.decode(errors="replace")
    if isinstance(body, dict):
        code, message = body.get("code"), body.get("message")
        if isinstance(code, str) and isinstance(message, str):
            return f"{code}: {message}"
        errors = body.get("errors")  # the registry's shape on /v2
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return f"{first.get('code', 'error')}: {first.get('message', '')}".rstrip(": ")
        if isinstance(message, str):
            return message
    text = str(body).strip() if body not in (None, "") else ""
    try:
        reason = f" {HTTPStatus(status).phrase}"
    except ValueError:
        reason = ""
    return f"HTTP {status}{reason}" + (f": {' '.join(text.split())[:300]}" if text else "")


def _auth_hint(status: int) -> str:
    return f" ({TOKEN_HINT})" if status == 401 else ""


def unreachable(base_url: str, cause: BaseException | None) -> str:
    reason = ""
    if cause is not None:
        text = str(cause) or type(cause).__name__
        reason = f" ({' '.join(text.split())})"
    return (f"cannot reach the Hypeman server at {base_url}{reason}; is it running? "
            "(--base-url, HYPEMAN_BASE_URL)")


def _websocket_refusal(exc: BaseException) -> str | None:
    """A refused WebSocket upgrade (websockets' ``InvalidStatus``) carries the HTTP response."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if not isinstance(status, int):
        return None
    body = getattr(response, "body", b"") or b""
    return error_body_line(status, body) + _auth_hint(status)


def describe(exc: BaseException, base_url: str) -> str:
    """The one line a person reads for ``exc``."""
    if isinstance(exc, CLIError):
        return exc.message
    if isinstance(exc, APITimeoutError):
        return f"the Hypeman server at {base_url} did not answer in time"
    if isinstance(exc, APIConnectionError):
        return unreachable(base_url, exc.__cause__)
    if isinstance(exc, APIStatusError):
        return error_body_line(exc.status_code, exc.body) + _auth_hint(exc.status_code)
    if isinstance(exc, (ExecProtocolError, CopyProtocolError)):
        return str(exc)
    if isinstance(exc, HypemanError):
        return str(exc)
    refusal = _websocket_refusal(exc)
    if refusal is not None:
        return refusal
    if isinstance(exc, ConnectionError) or type(exc).__name__ in ("ConnectError", "ConnectTimeout"):
        return unreachable(base_url, exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
