"""``/builds``. Thin: read the form, call the build service, shape the answer.

``POST /builds`` is ``multipart/form-data`` (``hypeman.types.BuildCreateParams``): the ``source``
tar.gz and text fields, every one optional but the source. The form is read as it arrives
(``form_stream.py``) and the source goes to ``BuildService.create`` as an async iterator of
1 MiB pieces, never held whole:

- fields sent **before** the source (what the Python SDK does) make the spec, which is checked
  before the first byte of the source is read; the source then streams straight into the
  service, and a field after it is refused (400): the build was made without it;
- a source sent **first** (as the TypeScript SDK sends a file given first) cannot be streamed:
  the fields that make its spec are still to come. It is spooled to an unnamed file on the data
  disk (``DataLayout.build_uploads``), bounded like the stream, and handed over from there once
  the fields are read.

A source over ``HYPEMAND_MAX_BUILD_SOURCE_BYTES`` is refused with 413 ``too_large`` once that many
bytes have arrived (``body_limit.py`` bounds the whole body at the source's limit plus the
fields'). Every field is checked strictly, each refusal a 400 naming the field; an admin build
(``is_admin_build``: it may write the global cache) needs a token that may administer builds:
one without a ``permissions`` claim, or with ``*`` or ``build:admin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import IO, Any, Protocol

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from hypemand.api.auth import authorize
from hypemand.api.errors import ApiError
from hypemand.api.form_stream import FormStream, form_error
from hypemand.api.limits import MAX_BUILD_FORM_BYTES, MAX_BUILD_FORM_FIELD_BYTES, MiB
from hypemand.api.query import tag_filter
from hypemand.builds.models import MAX_CPUS, MAX_MEMORY_MB, MAX_TIMEOUT_SECONDS, Build, BuildEvent, BuildSpec
from hypemand.errors import DomainError
from hypemand.layout import DataLayout
from hypemand.units import format_size

router = APIRouter()

# What the service is handed at a time (and what a spooled source is read back in).
SOURCE_PIECE_BYTES = 1 * MiB
ADMIN_SCOPE = "build:admin"
SOURCE_FIELD = "source"
TEXT_FIELDS = (
    "dockerfile", "base_image_digest", "builder_id", "cache_scope", "global_cache_key", "image_name",
)
INTEGER_FIELDS = ("timeout_seconds", "memory_mb", "cpus")
JSON_FIELDS = ("secrets", "tags")
FLAG_FIELDS = ("is_admin_build",)
FORM_FIELDS = frozenset((*TEXT_FIELDS, *INTEGER_FIELDS, *JSON_FIELDS, *FLAG_FIELDS))
_INTEGER = re.compile(r"-?[0-9]{1,19}")
_FLAGS = {"true": True, "1": True, "false": False, "0": False}


class BuildsApi(Protocol):
    """What these routes use of ``hypemand.builds.service.BuildService``."""

    async def create(self, spec: BuildSpec, source: AsyncIterator[bytes]) -> Build: ...

    async def list_builds(self, tags: dict[str, str] | None = None) -> list[Build]: ...

    async def get(self, build_id: str) -> Build: ...

    async def cancel(self, build_id: str) -> None: ...

    def events(self, build_id: str, follow: bool) -> AsyncIterator[BuildEvent]: ...


def _service(request: Request) -> BuildsApi:
    service: BuildsApi = request.app.state.runtime.builds
    return service


# ---- the form ----------------------------------------------------------------------------------


def _integer(name: str, text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise form_error(f"{name}: {text[:40]!r} is not an integer")
    return int(text)


def _json(text: str) -> Any:
    """The field's JSON value, or None when it is not JSON. Nesting deep enough to exhaust
    Python's recursion (``[[[[...``) is RecursionError, not ValueError: refused the same way."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _secrets(text: str) -> list[Any]:
    value = _json(text)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise form_error('secrets: must be a JSON array of objects like [{"id": "npm_token"}]')
    return value


def _tags(text: str) -> dict[str, Any]:
    value = _json(text)
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise form_error('tags: must be a JSON object of strings like {"team": "backend"}')
    return value


def _flag(name: str, text: str) -> bool:
    flag = _FLAGS.get(text.strip().lower())
    if flag is None:
        raise form_error(f"{name}: {text[:40]!r} is not true or false")
    return flag


def build_spec(fields: dict[str, str]) -> BuildSpec:
    """The spec of a form's text fields (all but the source); a 400 naming a field that is not
    what the API says it is."""
    values: dict[str, Any] = {}
    for name, text in fields.items():
        if name in INTEGER_FIELDS:
            values[name] = _integer(name, text)
        elif name == "secrets":
            values[name] = _secrets(text)
        elif name == "tags":
            values[name] = _tags(text)
        elif name in FLAG_FIELDS:
            values[name] = _flag(name, text)
        else:
            values[name] = text
    try:
        return BuildSpec.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _read_fields(form: FormStream, fields: dict[str, str]) -> str | None:
    """Read text fields into ``fields`` up to the source (whose name is returned) or the form's
    end (None). A field the API does not have, or one given twice, is a 400."""
    while (part := await form.next_part()) is not None:
        if part.name == SOURCE_FIELD:
            return part.name
        if part.name not in FORM_FIELDS:
            raise form_error(f"{part.name[:80]}: not a field of a build (the fields are source, "
                             f"{', '.join(sorted(FORM_FIELDS))})")
        if part.name in fields:
            raise form_error(f"{part.name}: given more than once")
        fields[part.name] = await form.read_text(part.name, MAX_BUILD_FORM_FIELD_BYTES)
    return None


def _too_large(limit: int) -> ApiError:
    message = f"the build source is larger than the {format_size(limit)} this server accepts"
    return ApiError(413, "too_large", message)


async def _source_pieces(form: FormStream, limit: int) -> AsyncIterator[bytes]:
    """The source part's bytes in pieces of :data:`SOURCE_PIECE_BYTES` (the last one shorter),
    refused once more than ``limit`` bytes arrived."""
    received = 0
    buffer = bytearray()
    async for data in form.chunks():
        received += len(data)
        if received > limit:
            raise _too_large(limit)
        buffer += data
        while len(buffer) >= SOURCE_PIECE_BYTES:
            yield bytes(buffer[:SOURCE_PIECE_BYTES])
            del buffer[:SOURCE_PIECE_BYTES]
    if buffer:
        yield bytes(buffer)


async def _streamed_source(form: FormStream, limit: int) -> AsyncGenerator[bytes, None]:
    """The source straight from the request. Its end is reported only once the rest of the form
    is read and found empty, so a build never starts from a form that was not whole."""
    async for piece in _source_pieces(form, limit):
        yield piece
    if (part := await form.next_part()) is not None:
        raise form_error(f"{part.name[:80]}: sent after the source; a form whose source is not "
                         "its first part must have every field before the source")


def _unnamed_file(directory: Path) -> IO[bytes]:
    return tempfile.TemporaryFile(dir=directory)


async def _spool(form: FormStream, layout: DataLayout, limit: int) -> IO[bytes]:
    """The source part written to an unnamed file on the data disk (gone when closed, or when
    the server dies), rewound."""
    await asyncio.to_thread(layout.build_uploads.mkdir, parents=True, exist_ok=True)
    spool = await asyncio.to_thread(_unnamed_file, layout.build_uploads)
    try:
        async for piece in _source_pieces(form, limit):
            await asyncio.to_thread(spool.write, piece)
        await asyncio.to_thread(spool.seek, 0)
    except BaseException:
        spool.close()
        raise
    return spool


async def _spooled_source(spool: IO[bytes]) -> AsyncGenerator[bytes, None]:
    while piece := await asyncio.to_thread(spool.read, SOURCE_PIECE_BYTES):
        yield piece


async def _create(request: Request, form: FormStream) -> Build:
    runtime = request.app.state.runtime
    limit: int = runtime.settings.max_build_source_bytes
    fields: dict[str, str] = {}
    if await _read_fields(form, fields) is None:
        raise form_error("source: required (the build context as a tar.gz file)")
    spool: IO[bytes] | None = None
    if not fields:
        # The source came first: its spec is in the fields after it.
        spool = await _spool(form, runtime.layout, limit)
    try:
        if spool is not None and await _read_fields(form, fields) is not None:
            raise form_error("source: given more than once")
        spec = build_spec(fields)
        if spec.is_admin_build:
            authorize(request, ADMIN_SCOPE)  # 403 unless the token may administer builds
        source = _spooled_source(spool) if spool is not None else _streamed_source(form, limit)
        async with contextlib.aclosing(source):
            return await _service(request).create(spec, source)
    finally:
        if spool is not None:
            await asyncio.to_thread(spool.close)


# The body as the document shows it (FastAPI documents no body for a route that reads its own).
_INTEGER_SCHEMAS = {
    "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_SECONDS},
    "memory_mb": {"type": "integer", "minimum": 256, "maximum": MAX_MEMORY_MB},
    "cpus": {"type": "integer", "minimum": 1, "maximum": MAX_CPUS},
}
FORM_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "required": [SOURCE_FIELD],
    "additionalProperties": False,
    "properties": {
        SOURCE_FIELD: {"type": "string", "format": "binary", "description": "The build context (tar.gz)"},
        **{name: {"type": "string"} for name in TEXT_FIELDS},
        **_INTEGER_SCHEMAS,
        "is_admin_build": {"type": "string", "enum": ["true", "false"]},
        "secrets": {"type": "string", "description": 'JSON array: [{"id": "npm_token"}]'},
        "tags": {"type": "string", "description": 'JSON object of strings: {"team": "backend"}'},
    },
}}}}}


@router.post("/builds", status_code=202, response_model=Build, openapi_extra=FORM_BODY,
             responses={404: {"description": "No builder with that builder_id"}})
async def create_build(request: Request) -> Build:
    form = FormStream(request.stream(), request.headers.get("content-type", ""))
    try:
        return await _create(request, form)
    except (DomainError, ApiError, RequestValidationError) as exc:
        if getattr(exc, "status", 400) != 413:
            await form.drain(MAX_BUILD_FORM_BYTES)  # the client may read the answer only once sent
        raise


@router.get("/builds", response_model=list[Build])
async def list_builds(request: Request) -> list[Build]:
    return await _service(request).list_builds(tags=tag_filter(request) or None)


@router.get("/builds/{build_id}", response_model=Build)
async def get_build(build_id: str, request: Request) -> Build:
    return await _service(request).get(build_id)


@router.delete("/builds/{build_id}", status_code=204)
async def cancel_build(build_id: str, request: Request) -> Response:
    await _service(request).cancel(build_id)
    return Response(status_code=204)


def _sse_event(event: BuildEvent) -> bytes:
    # The same framing as the instance logs (logs.py); here each data item is a BuildEvent object.
    return f"data: {event.model_dump_json()}\n\n".encode()


async def _event_stream(events: AsyncIterator[BuildEvent]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield _sse_event(event)
    finally:
        # Starlette cancels this generator when the client leaves: the service's follow ends too.
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


EVENTS_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-Sent Events, each data item a BuildEvent",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}}


@router.get("/builds/{build_id}/events", response_class=StreamingResponse, responses=EVENTS_RESPONSE)
async def build_events(build_id: str, request: Request, follow: bool = False) -> StreamingResponse:
    service = _service(request)
    await service.get(build_id)  # 404 before the stream starts
    return StreamingResponse(
        _event_stream(service.events(build_id, follow)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
