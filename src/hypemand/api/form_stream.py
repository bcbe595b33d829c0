"""A ``multipart/form-data`` body read part by part as it arrives, never held whole.

Starlette's ``request.form()`` reads the whole body first and spools each file to a temporary
file (on ``/tmp``, often memory); ``POST /builds`` instead hands the source file's bytes to the
build service while they arrive. ``python-multipart`` (the parser Starlette itself uses) does the
parsing; it pushes callbacks as it is fed, and :class:`FormStream` turns them into a pull API:
:meth:`FormStream.next_part`, then the part's bytes with :meth:`FormStream.chunks` or
:meth:`FormStream.read_text`.

A form that is not well-formed (no boundary, a part without a name, a body that ends before the
closing boundary) is a 400 ``invalid_request``. Headers are bounded by the parser (8 per part,
4 KiB each); the parts' data is bounded by the caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from hypemand.errors import BadRequest


@dataclass(frozen=True)
class PartHeader:
    name: str
    filename: str | None  # set for a file part


class _PartData(bytes):
    """A piece of the current part's data."""


class _PartEnd:
    pass


class _FormEnd:
    pass


_Event = PartHeader | _PartData | _PartEnd | _FormEnd
_PART_END = _PartEnd()
_FORM_END = _FormEnd()


def form_error(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_request")


class FormStream:
    def __init__(self, body: AsyncIterator[bytes], content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise form_error("the request must be multipart/form-data with a boundary")
        self._body = body
        self._events: deque[_Event] = deque()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._in_part = False  # the current part's data has not been read to its end
        self._exhausted = False  # the body has no more bytes
        try:
            self._parser = MultipartParser(boundary, {
                "on_part_begin": self._headers.clear,
                "on_header_field": self._add_header_field,
                "on_header_value": self._add_header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": lambda: self._events.append(_PART_END),
                "on_end": lambda: self._events.append(_FORM_END),
            })
        except ValueError as exc:  # python-multipart's FormParserError: a boundary over 70 bytes
            raise form_error(f"invalid multipart boundary: {exc}") from None

    # ---- python-multipart's callbacks ---------------------------------------------------------

    def _add_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _add_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise form_error("every part of the form needs a Content-Disposition: form-data with a name")
        filename = options.get(b"filename")
        self._events.append(PartHeader(
            name=name.decode("utf-8", "replace"),
            filename=None if filename is None else filename.decode("utf-8", "replace"),
        ))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(_PartData(data[start:end]))

    # ---- reading ------------------------------------------------------------------------------

    async def _next_event(self) -> _Event:
        while not self._events:
            if self._exhausted:
                raise form_error("the form ended before its closing boundary")
            chunk = await anext(self._body, None)
            if chunk is None:
                self._exhausted = True
                continue
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise form_error(f"malformed multipart form: {exc}") from None
        return self._events.popleft()

    async def next_part(self) -> PartHeader | None:
        """The next part's name and file name; None once the closing boundary has been read.
        Whatever is left of the current part is skipped."""
        while True:
            event = await self._next_event()
            if isinstance(event, PartHeader):
                self._in_part = True
                return event
            if isinstance(event, _FormEnd):
                return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The current part's data, in the pieces the client's body arrived in."""
        while self._in_part:
            event = await self._next_event()
            if isinstance(event, _PartData):
                yield bytes(event)
            elif isinstance(event, _PartEnd):
                self._in_part = False

    async def read_text(self, name: str, max_bytes: int) -> str:
        """The current part as UTF-8 text of at most ``max_bytes``; else a 400 naming it."""
        value = bytearray()
        async for data in self.chunks():
            value += data
            if len(value) > max_bytes:
                raise form_error(f"{name}: longer than the {max_bytes} bytes this field may have")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise form_error(f"{name}: not valid UTF-8 text") from None

    async def drain(self, max_bytes: int) -> None:
        """Read and drop what is left of the body, up to ``max_bytes`` (so that a client which
        sends its whole body before reading the answer hears it)."""
        dropped = 0
        while not self._exhausted and dropped <= max_bytes:
            chunk = await anext(self._body, None)
            if chunk is None:
                self._exhausted = True
            else:
                dropped += len(chunk)
