"""The request-body limit at the edge: no request can make the server hold more than its
route's limit (``api/limits.py``) in memory.

A declared ``Content-Length`` over the limit is refused before anything is read (a client that
sent ``Expect: 100-continue`` is never asked for the body). A body without a length (chunked) is
counted as it arrives: once it passes the limit the refusal is sent and the application is told
the client has gone, so no reader goes on collecting it. Refusals are 413 in the shape of the
route's protocol: ``{code, message}`` for the API, ``{"errors": [...]}`` under ``/v2``.

Registry blob uploads and volume archives have no limit here: they are streamed to disk in
bounded pieces (a volume's archive is bounded by the volume's size, in ``hypemand.volumes``).
``POST /builds`` (a build's source and its form fields, streamed too) is bounded by the server's
build source limit plus the form's fields (``limits.MAX_BUILD_FORM_BYTES``); the source itself
is held to its limit by ``api/builds.py``.
WebSocket messages are bounded by the server's ``ws_max_size`` (see ``limits.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypemand.api.errors import error_response
from hypemand.api.limits import (
    MAX_BUILD_FORM_BYTES,
    MAX_JSON_BODY_BYTES,
    MAX_MANIFEST_BODY_BYTES,
    MAX_REGISTRY_OTHER_BODY_BYTES,
)
from hypemand.api.registry import oci_error
from hypemand.units import format_size

_REGISTRY = re.compile(r"^/v2(/|$)")
# The upload routes of registry.py: POST .../blobs/uploads[/], PATCH/PUT .../blobs/uploads/<id>.
_BLOB_UPLOAD = re.compile(r"^/v2/.+/blobs/uploads(/[^/]*)?$")
_MANIFEST = re.compile(r"^/v2/.+/manifests/[^/]+$")
_VOLUME_ARCHIVE = "/volumes/from-archive"
_BUILDS = "/builds"


@dataclass(frozen=True)
class Limit:
    max_bytes: int
    registry: bool  # answer in the registry's error shape

    def refusal(self) -> JSONResponse:
        message = f"the request body is larger than the {format_size(self.max_bytes)} this endpoint accepts"
        if self.registry:
            return oci_error(413, "SIZE_INVALID", message)
        return error_response(413, "too_large", message)


def limit_for(path: str, max_build_source_bytes: int = 0) -> Limit | None:
    """The body limit of a path; None for registry blob uploads and volume archives (streamed to
    disk, bounded by their handlers)."""
    if path == _VOLUME_ARCHIVE:
        return None
    if path == _BUILDS:
        return Limit(max_build_source_bytes + MAX_BUILD_FORM_BYTES, registry=False)
    if not _REGISTRY.match(path):
        return Limit(MAX_JSON_BODY_BYTES, registry=False)
    if _BLOB_UPLOAD.match(path):
        return None
    if _MANIFEST.match(path):
        return Limit(MAX_MANIFEST_BODY_BYTES, registry=True)
    return Limit(MAX_REGISTRY_OTHER_BODY_BYTES, registry=True)


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimit:
    """ASGI middleware enforcing :func:`limit_for` on every HTTP request."""

    def __init__(self, app: ASGIApp, max_build_source_bytes: int = 0) -> None:
        self.app = app
        self.max_build_source_bytes = max_build_source_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = limit_for(scope["path"], self.max_build_source_bytes) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > limit.max_bytes:
            await limit.refusal()(scope, receive, send)
            return
        received = 0
        response_started = False
        refused = False  # the 413 went out: the application's own answer goes nowhere

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    if not response_started:
                        refused = True
                        await limit.refusal()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
