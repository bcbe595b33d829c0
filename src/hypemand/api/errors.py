"""The API's one error shape: ``{"code": ..., "message": ...}``.

Domain code raises :class:`hypemand.errors.DomainError` subclasses; this module maps them to
HTTP status codes so that the domain never needs to know about HTTP.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypemand.api.limits import summary
from hypemand.errors import DomainError
from hypemand.fsutil import is_no_space

log = logging.getLogger(__name__)
# Longer than any message the server writes itself; shorter than what a client could make one.
_LOGGED_MESSAGE_CHARS = 2000


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"code": code, "message": message})


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(DomainError)
    async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
        if exc.status >= 500:
            # The server's own failures are kept in its log (the answer may be cut short by a
            # client); the path and the message may carry what a client sent, so both are bounded.
            log.warning("%s %s failed: %s: %s", request.method, summary(request.url.path), exc.code,
                        summary(str(exc), _LOGGED_MESSAGE_CHARS))
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(400, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail))

    app.add_middleware(UnexpectedErrors)


class UnexpectedErrors:
    """Answer an unexpected exception with a 500 in the error shape, and keep the connection.

    Starlette's own handler for ``Exception`` answers and then re-raises, and uvicorn closes the
    connection under a client that will reuse it: its next request fails as a reset. Here the
    error is logged once and answered; a full disk (ENOSPC from anywhere below) is a 507 that
    says so, without the host's paths.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left before its body was read (or was cut off): nobody to answer
        except Exception as exc:
            if started:
                raise  # the answer is under way: nothing better can be sent
            if is_no_space(exc):
                message = "no space left on the server's data disk"
                response = error_response(507, "insufficient_storage", message)
            else:
                log.exception("unexpected error in %s %s", scope.get("method"), summary(scope.get("path")))
                response = error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
            await response(scope, receive, send)
